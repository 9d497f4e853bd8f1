"""A byte-level tokenizer: token i < 256 is the byte i; two specials follow.

Any text round-trips (UTF-8 bytes in, UTF-8 bytes out), so the demo needs no
vocabulary file and no download."""
from kvcache.checks import invalid

BOS_ID = 256
EOS_ID = 257
VOCAB_SIZE = 258


class ByteTokenizer:
    """``encode(text) -> list[int]`` (optionally prefixed with BOS);
    ``decode(ids) -> str`` (specials dropped; bytes that are not valid UTF-8
    become U+FFFD, as a streaming server shows a partial character)."""

    bos_id = BOS_ID
    eos_id = EOS_ID
    vocab_size = VOCAB_SIZE

    def encode(self, text, bos=True):
        if not isinstance(text, str):
            raise invalid(f"text must be str, got {type(text).__name__}")
        return ([BOS_ID] if bos else []) + list(text.encode("utf-8"))

    def decode(self, ids):
        """Raises LLMException(LLM_PARAM_INVALID) for an id outside the vocabulary."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < VOCAB_SIZE]
        if bad:
            raise invalid(f"token ids outside 0..{VOCAB_SIZE - 1}: {bad[:5]}")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
