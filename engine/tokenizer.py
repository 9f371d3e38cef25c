"""tokenizer.json through the `tokenizers` library, EOS ids, chat template, incremental detokenization."""

import json
from dataclasses import dataclass
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer

from optd.engine.config import EngineError


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EngineError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise EngineError(f"{path}: expected a JSON object")
    return data


def _token_text(value) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as {"content": ...} objects.
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, folder: Path):
        path = folder / "tokenizer.json"
        if not path.exists():
            raise EngineError(f"{path}: missing (only tokenizer.json tokenizers are supported)")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises its own exception types
            raise EngineError(f"{path}: cannot be loaded: {e}") from None
        config = _read_json(folder / "tokenizer_config.json")
        generation = _read_json(folder / "generation_config.json")
        model = _read_json(folder / "config.json")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.add_bos = bool(config.get("add_bos_token", False))
        self.eos_token_ids = self._eos_ids(generation, model)
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template = template

    def _eos_ids(self, generation: dict, model: dict) -> set[int]:
        eos = generation.get("eos_token_id", model.get("eos_token_id"))
        ids = set(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
        if self.eos_token and (tid := self._tok.token_to_id(self.eos_token)) is not None:
            ids.add(tid)
        return ids

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        # tokenizer.json's post-processor usually adds BOS itself; add it only where it did not.
        if add_special_tokens and self.add_bos and self.bos_token_id is not None and ids[:1] != [
            self.bos_token_id
        ]:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise EngineError("this model has no chat_template in tokenizer_config.json")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str):
            raise EngineError(f"chat template: {message}")

        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as e:
            raise EngineError(f"chat template failed: {e}") from None


@dataclass
class Detokenizer:
    """Turns a growing token list into text deltas without re-decoding everything.

    Decodes a short window that starts a few tokens back, so that tokenizers which drop a leading
    space at the start of a decode (SentencePiece) and byte-level pieces of one UTF-8 character
    split over several tokens both come out right.
    """

    tokenizer: Tokenizer
    prefix_offset: int
    read_offset: int

    @classmethod
    def after_prompt(cls, tokenizer: Tokenizer, prompt_len: int) -> "Detokenizer":
        return cls(tokenizer, max(prompt_len - 5, 0), prompt_len)

    def step(self, all_ids: list[int]) -> str:
        prefix = self.tokenizer.decode(all_ids[self.prefix_offset : self.read_offset])
        text = self.tokenizer.decode(all_ids[self.prefix_offset :])
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        self.prefix_offset, self.read_offset = self.read_offset, len(all_ids)
        return text[len(prefix) :]
