"""Tensor-parallel logits and generations on 8 CPU devices equal single-device ones, with the
attention kernel (interpret mode, inside shard_map) as with the reference.

jax fixes its device count at import, so the check runs in a child process with
XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from processes import child_env

CHILD = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    assert len(jax.devices()) == 8, jax.devices()
    from aurora_jax.models.attention import causal_mask
    from aurora_jax.models.config import TargetConfig
    from aurora_jax.models.hf_io import load_target, save_target
    from aurora_jax.models.sharding import make_mesh
    from aurora_jax.models.transformer import forward, init_random
    from aurora_jax.engine.target_only import TargetGenerator
    import sys
    out = sys.argv[1]
    # 8 query heads / 8 kv heads split over tp=8; 8 q / 2 kv heads leaves kv replicated.
    for kv, (dp, tp) in [(8, (1, 8)), (2, (2, 4)), (4, (1, 8))]:
        cfg = TargetConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                           num_layers=3, num_heads=8, num_kv_heads=kv, head_dim=8,
                           family="qwen3" if kv == 4 else "llama", eos_token_ids=(1,))
        path = f"{out}/m{kv}"
        save_target(path, cfg, init_random(cfg, seed=kv)[1])
        single = load_target(path, mesh=make_mesh(tp=1, devices=jax.devices()[:1]))
        mesh = make_mesh(tp=tp, dp=dp)
        sharded = load_target(path, mesh=mesh)
        q = sharded.state["layers"][0]["attn"]["q_proj"]["kernel"][...]
        assert len(q.sharding.device_set) == 8 and q.sharding.spec[1] == "tp", q.sharding
        ids = jnp.asarray(np.random.RandomState(0).randint(0, 128, (4, 10)))
        pos = jnp.broadcast_to(jnp.arange(10), (4, 10))
        mask = causal_mask(jnp.array([10, 7, 3, 10]), 10)
        a = np.asarray(jax.jit(forward)(single.graphdef, single.state, ids, pos, mask)[0])
        b = np.asarray(jax.jit(forward)(sharded.graphdef, sharded.state, ids, pos, mask)[0])
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
        prompts = [[3, 4, 5], [7, 8, 9, 10, 11]]
        ga = TargetGenerator(single).generate(prompts, 12)
        gb = TargetGenerator(sharded).generate(prompts, 12)
        assert [c.token_ids for c in ga.completions] == [c.token_ids for c in gb.completions]
        if kv == 2:  # the speculative engine on a dp x tp mesh (draft replicated)
            from aurora_jax.engine.engine import Engine, Request
            from aurora_jax.models.eagle3 import DraftConfig
            from aurora_jax.models.eagle3 import init_draft
            from aurora_jax.speculative.config import SpecConfig
            draft = init_draft(DraftConfig.for_target(cfg), seed=0, mesh=mesh)
            engine = Engine(sharded, draft, SpecConfig(mode="tree", depth=3, topk=2,
                            num_draft_tokens=5), max_slots=2, max_len=32)
            run = engine.run([Request(p, 12) for p in prompts])
            assert [r.token_ids for r in run.results] == [c.token_ids for c in ga.completions]
        if kv in (8, 2):  # the kernel (interpret mode) inside shard_map: heads over tp=8,
            # or the batch over dp=2 with the 2 kv heads whole on each of the 4 tp devices
            kernel = load_target(path, mesh=mesh, cfg_overrides={"attention": "interpret"})
            gk = TargetGenerator(kernel).generate(prompts, 12)
            assert [c.token_ids for c in gk.completions] == [c.token_ids for c in ga.completions]
    print("TP-OK")
""")


def test_tensor_parallel_equals_single_device(tmp_path):
    env = child_env(devices=8)
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "TP-OK" in r.stdout, r.stdout + r.stderr
