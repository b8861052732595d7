"""A short soak (about two minutes on 2 cores): the server under load with a learner process
that is killed and restarted, bad drafts dropped beside its good ones, a full disk for the
traces and clients that hang up; nothing served may be wrong, lost or leaked. The ten-minute
run on SmolLM2 is `scripts/soak.py`."""

from __future__ import annotations

import pytest
from serving import PROMPTS

from aurora_jax.serve.config import ServeConfig, ServeLearner
from aurora_jax.speculative.config import SpecConfig
from aurora_jax.testing.soak import SoakConfig, failures, run_soak, table


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_short_soak_serves_nothing_wrong_and_loses_nothing(chat_ckpt, tmp_path):
    serve = ServeConfig(target=str(chat_ckpt), draft="scratch", draft_vocab_size=None,
                        spec=SpecConfig(mode="tree", depth=3, topk=2, num_draft_tokens=6),
                        max_slots=4, max_len=96, learner=ServeLearner(mode="workdir",
                                                                        workdir="unused"))
    cfg = SoakConfig(duration_s=60, rate=3.0, max_tokens=16, cancel_every=5,
                     learner_kill_every_s=30, bad_draft_every_s=10, disk_full_at_s=(15.0,),
                     disk_full_s=8, learner_args=(
                         "online.every_steps=3", "online.batch_size=4", "online.seq_len=32",
                         "online.min_sequences=2", "loss.ttt_steps=2"))
    report = run_soak(serve, chat_ckpt, PROMPTS, cfg, tmp_path / "soak")
    print(table(report))
    assert failures(report) == []
    assert report["load"]["requests"] >= 100 and report["load"]["completed"] >= 60
    assert report["learner"]["kills"] == 1 and report["learner"]["starts"] >= 2
    assert report["faults"]["trace writes fail (ENOSPC)"] == 1
    assert len(report["drafts_refused"]) >= 3  # damaged, non-finite, misfit
    assert report["hot_swaps"] >= 1  # the learner's drafts got through the faults
