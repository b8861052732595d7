"""What the serving tests share: a chat template for the small checkpoint (conftest's
`chat_ckpt`), the prompts they send, and the settings of the one server that test_serve.py
and test_serve_fuzz.py both talk to (conftest's `shared_server`)."""

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                 "<assistant>")
PROMPTS = ["def fibonacci(n):\n    ", "import os\nimport sys\n", "class Config:\n    def",
           "The standard library", "for i in range(10):", "# sort a list\n"]

KEY = "test-key"
"""The shared server's API key (so that /admin/draft serves)."""
MODEL = "tiny"
MAX_LEN = 192
"""Tokens of prompt and completion: prompts over it are cheap to make."""
MAX_TOKENS = 8
"""The default max_tokens, and what the fuzzed requests ask for at most (to stay cheap)."""
MAX_BODY = 65536
"""Bytes: so are bodies over it."""
MAX_SLOTS = 4


def shared_config(ckpt):
    """The shared server: a scratch draft speculating in tree mode (depth 3, 6 nodes), an API
    key, four slots, no learning and no adaptive windows, so that outputs and metrics are
    deterministic."""
    from aurora_jax.serve.config import ServeConfig, ServeLearner
    from aurora_jax.speculative.config import SpecConfig

    return ServeConfig(target=str(ckpt), draft="scratch", draft_vocab_size=None,
                       spec=SpecConfig(mode="tree", depth=3, topk=2, num_draft_tokens=6),
                       max_slots=MAX_SLOTS, max_len=MAX_LEN, max_queue=32,
                       default_max_tokens=MAX_TOKENS, max_body_bytes=MAX_BODY, port=0,
                       api_key=KEY, model_name=MODEL, learner=ServeLearner(mode="off"),
                       window_steps=None)
