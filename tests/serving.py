"""What the serving tests share: a chat template for the small checkpoint (conftest's
`chat_ckpt`) and the prompts they send."""

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                 "<assistant>")
PROMPTS = ["def fibonacci(n):\n    ", "import os\nimport sys\n", "class Config:\n    def",
           "The standard library", "for i in range(10):", "# sort a list\n"]
