"""Tiny random Hugging Face checkpoints of each supported family, saved with save_pretrained.

transformers is a test dependency only: it writes the checkpoints and is the reference we compare to.
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "import os\nimport sys\n\nclass Path:\n    def __init__(self, name):\n        self.name = name\n",
    "for i in range(10):\n    print(i, 'héllo wörld', [x * 2 for x in range(i)])\n",
] * 4

COMMON = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1)
FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3"]


def hf_config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**COMMON, tie_word_embeddings=False)
    if family == "llama3":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 32, "rope_theta": 500000.0}
        return tf.LlamaConfig(**COMMON, rope_parameters=scaling, tie_word_embeddings=True)
    if family == "mistral":
        return tf.MistralConfig(**COMMON, sliding_window=None, head_dim=16)
    if family == "qwen2":
        return tf.Qwen2Config(**COMMON, tie_word_embeddings=True)
    if family == "qwen3":
        return tf.Qwen3Config(**{**COMMON, "num_key_value_heads": 1}, head_dim=32, tie_word_embeddings=False)
    raise ValueError(family)


def write_tokenizer(folder: Path) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=COMMON["vocab_size"], special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        '{"bos_token": "<s>", "eos_token": "</s>", "chat_template": '
        '"{% for m in messages %}# {{ m.role }}: {{ m.content }}\\n{% endfor %}'
        '{% if add_generation_prompt %}# assistant:{% endif %}"}'
    )


def make_checkpoint(family: str, folder: Path, seed: int = 0) -> Path:
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_config(family)).float().eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so the test covers them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder)
    return folder


def make_tiny_vocab_pair(folder: Path, vocab: int = 12) -> tuple[Path, Path]:
    """Target and draft over a word-level vocabulary of `vocab` tokens, with sharp, different
    next-token distributions (large random weights), for testing sampling distributions."""
    import transformers as tf
    from tokenizers import models as tok_models

    paths = []
    for name, seed, layers in (("target", 1, 2), ("draft", 2, 1)):
        path = folder / name
        torch.manual_seed(seed)
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                             max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
        model = tf.LlamaForCausalLM(cfg).float().eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.5)
        model.save_pretrained(path, safe_serialization=True)
        tok = Tokenizer(tok_models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w2"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.save(str(path / "tokenizer.json"))
        paths.append(path)
    return paths[0], paths[1]
