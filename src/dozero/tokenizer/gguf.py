"""GGUF files (llama.cpp's format): the container's header, and the tokenizer its metadata describes.

A GGUF file is one binary file: a header of typed key/value metadata ("llama.block_count" = 30,
"tokenizer.ggml.tokens" = [...]), a table of tensors (name, shape, type, offset), then the tensor data.
This module reads the header only; `dozero.model.gguf` reads the tensors. Spec:
github.com/ggml-org/ggml/blob/master/docs/gguf.md.

    header = read_gguf_header("SmolLM2-135M-Instruct.Q4_1.gguf")   # metadata + tensor table, no data
    tok = tokenizer_from_gguf(header)                               # a BPETokenizer (tiktoken fast path)
    load_tokenizer("model.gguf")                                    # the same, from dozero.tokenizer

A byte-level BPE vocabulary ("tokenizer.ggml.model" = "gpt2") is stored as its tokens in GPT-2's
printable-character form, its merges in rank order, a type per token (1 normal, 3 control, 4 user-defined,
...) and the name of the pre-tokenizer ("tokenizer.ggml.pre"), which llama.cpp maps to its regexes.

Why not `gguf.GGUFReader`: it builds a numpy view per metadata string, ~7 s for SmolLM2's 98k tokens and
merges on the 2-core machine measured; reading the header with `struct` takes ~0.2 s.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from dozero.errors import DozeroError
from dozero.tokenizer.bpe import GPT2_PATTERN, BPETokenizer, bytes_to_unicode

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v1 (2023) counted with 32-bit integers; llama.cpp itself no longer reads it
DEFAULT_ALIGNMENT = 32
TOKENIZER_GGUF = "tokenizer.gguf"  # a vocabulary-only GGUF in a model folder (GGUFTokenizer.save)

# Metadata value types (gguf.md, "gguf_metadata_value_type") -> struct format; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9

# llama.cpp's token types (llama_token_type); everything that is not NORMAL is never made by merges.
NORMAL, CONTROL = 1, 3

# Pre-tokenizer names (tokenizer.ggml.pre) -> the regex dozero hands to tiktoken.
# "smollm": llama.cpp (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_SMOLLM and the starcoder family) first cuts
# every digit out alone (`\p{N}`), then applies GPT-2's rules to the text between digits; Hugging Face's
# tokenizer.json for SmolLM2 says the same (Digits(individual_digits) then ByteLevel). As one regex: a digit
# is a chunk of its own, ` ?\p{N}+` is gone, and a run of spaces before a digit is cut whole (it ended a
# piece), hence `(?![^\s\p{N}])` where GPT-2 has `(?!\S)`.
SMOLLM_PATTERN = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?![^\s\p{N}])|\s"""
PRE_TOKENIZERS = {
    "gpt-2": GPT2_PATTERN,
    "smollm": SMOLLM_PATTERN,
    "starcoder": SMOLLM_PATTERN,
    "refact": SMOLLM_PATTERN,
    "codeshell": SMOLLM_PATTERN,
}
PATTERN_NAMES = {GPT2_PATTERN: "gpt-2", SMOLLM_PATTERN: "smollm"}  # for export: the first name of each


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (slowest dimension first); GGUF stores it fastest first
    ggml_type: int
    offset: int  # from the start of the file


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    file_size: int = 0

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, kind: type, default=None):
        """A metadata value of the expected kind (int, float, str, list), or a one-line error naming the key."""
        value = self.metadata.get(key, default)
        if value is None:
            raise DozeroError(f"{self.path}: metadata key '{key}' is missing; the file is incomplete")
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise DozeroError(f"{self.path}: metadata '{key}' should be {kind.__name__}, found {value!r}")
        return value


# ----------------------------------------------------------------------------- the header


class _Cursor:
    """Reads little-endian values from a buffer; running past its end is a truncated file."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, size: int) -> None:
        if self.pos + size > len(self.buf):
            raise DozeroError(f"{self.path}: the file ends inside its header (truncated); download or export it again")

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        self.need(size)
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return values if len(values) > 1 else values[0]

    def string(self) -> str:
        n = self.take("Q")
        self.need(n)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DozeroError(f"{self.path}: a metadata string at byte {self.pos - n} is not UTF-8 (corrupt)") from None

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item_kind, count = self.take("IQ")
            if item_kind in _SCALARS:  # one unpack for the whole array (token types: 49k values)
                size = count * struct.calcsize(_SCALARS[item_kind])
                self.need(size)
                values = struct.unpack_from(f"<{count}{_SCALARS[item_kind]}", self.buf, self.pos)
                self.pos += size
                return list(values)
            self.need(count)  # each item takes at least a byte: a garbage count is a truncated/corrupt file
            return [self.value(item_kind) for _ in range(count)]
        raise DozeroError(f"{self.path}: unknown metadata value type {kind} at byte {self.pos} (corrupt file?)")


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Metadata and tensor table of a GGUF file; no tensor data is read. One-line errors for a file that is
    not GGUF, a version dozero does not read, and a truncated or corrupt header."""
    path = Path(path)
    if not path.is_file():
        raise DozeroError(f"GGUF file '{path}' not found")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if f.read(4) != MAGIC:
            raise DozeroError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
        if size < 24:  # magic, version and the two counts
            raise DozeroError(f"{path}: the file ends inside its header (truncated); download or export it again")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(_Cursor(memoryview(buf), path), size)


def _parse(cur: _Cursor, size: int) -> GGUFHeader:
    try:
        cur.pos = 4
        version, n_tensors, n_kv = cur.take("IQQ")
        if version not in VERSIONS:
            raise DozeroError(f"{cur.path}: GGUF version {version}; dozero reads versions {VERSIONS}")
        if n_tensors > size or n_kv > size:  # each needs at least a byte: garbage counts mean corruption
            raise DozeroError(f"{cur.path}: the header claims {n_tensors} tensors and {n_kv} keys (corrupt file)")
        header = GGUFHeader(cur.path, version, {}, file_size=size)
        for _ in range(n_kv):
            key = cur.string()
            header.metadata[key] = cur.value(cur.take("I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.take("I")
            if n_dims > 4:
                raise DozeroError(f"{cur.path}: tensor '{name}' has {n_dims} dimensions (corrupt file?)")
            dims = [cur.take("Q") for _ in range(n_dims)]
            ggml_type, offset = cur.take("IQ")
            infos.append((name, tuple(reversed(dims)), ggml_type, offset))
    finally:
        cur.buf.release()
    alignment = header.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise DozeroError(f"{cur.path}: general.alignment {alignment!r} is not a power of two (corrupt file)")
    data_start = -(-cur.pos // alignment) * alignment
    for name, shape, ggml_type, offset in infos:
        if name in header.tensors:
            raise DozeroError(f"{cur.path}: tensor '{name}' appears twice (corrupt file)")
        header.tensors[name] = TensorInfo(name, shape, ggml_type, data_start + offset)
    return header


# ----------------------------------------------------------------------------- the tokenizer


class GGUFTokenizer(BPETokenizer):
    """A BPETokenizer read from GGUF metadata. It keeps what the file says beyond the vocabulary (the chat
    template, the begin/end ids; `eot_id` is the end-of-sequence token, where generation stops: for
    SmolLM2-Instruct <|im_end|>), saves itself as a vocabulary-only `tokenizer.gguf`, and allows what such
    vocabularies do: single bytes that are not tokens (SmolLM2 lacks 21, e.g. control byte 0x04).

    llama.cpp and transformers drop such a byte after the text is cut into chunks. tiktoken needs every
    byte, so the missing ones get ids after the vocabulary, and `encode` drops those ids: same chunks, same ids.
    """

    def __init__(self, ranks, special_tokens, pattern, name, chat_template=None, bos_id=None, eos_id=None):
        size = len(ranks) + len(special_tokens)
        self.absent_bytes = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
        placeholders = {b: size + k for k, b in enumerate(self.absent_bytes)}
        super().__init__({**ranks, **placeholders}, special_tokens, pattern, name)
        self.vocab_size, self.id_to_bytes = size, self.id_to_bytes[:size]
        self.chat_template, self.bos_id, self.eot_id = chat_template, bos_id, eos_id

    def _drop(self, ids: list[int]) -> list[int]:
        return [i for i in ids if i < self.vocab_size] if self.absent_bytes else ids

    def encode(self, text: str, special: str = "raise") -> list[int]:
        return self._drop(super().encode(text, special))

    def encode_batch(self, texts, special: str = "raise", num_threads: int | None = None) -> list[list[int]]:
        return [self._drop(ids) for ids in super().encode_batch(texts, special, num_threads)]

    def encode_bytes(self, data: bytes, special: str = "raise") -> list[int]:
        return self._drop(super().encode_bytes(data, special))

    def encode_reference(self, text: str, special: str = "raise") -> list[int]:
        return self._drop(super().encode_reference(text, special))

    def save(self, folder: str | os.PathLike) -> None:
        write_gguf_tokenizer(self, Path(folder) / TOKENIZER_GGUF)


def tokenizer_from_gguf(header: GGUFHeader) -> GGUFTokenizer:
    """The file's byte-level BPE tokenizer, ids as in the file (tested equal to transformers' and llama.cpp's)."""
    where = str(header.path)
    kind = header.metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise DozeroError(
            f"{where}: tokenizer.ggml.model is {kind!r}; dozero reads byte-level BPE vocabularies ('gpt2') only"
        )
    pre = header.metadata.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise DozeroError(
            f"{where}: pre-tokenizer '{pre}' is not one dozero knows ({', '.join(PRE_TOKENIZERS)}); "
            "its regex decides where words are cut, so guessing would give other ids than llama.cpp"
        )
    tokens = header.get("tokenizer.ggml.tokens", list)
    types = header.metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise DozeroError(f"{where}: {len(tokens)} tokens but {len(types)} token types (corrupt metadata)")
    # No merges: a vocabulary of single bytes and special tokens (gguf-py's writer even drops the empty array).
    merges = header.get("tokenizer.ggml.merges", list, default=[])
    ranks, specials = _ranks_and_specials(tokens, types, merges, where)
    if not merges and any(len(token) > 1 for token in ranks):  # llama.cpp would never make those tokens
        raise DozeroError(f"{where}: tokens longer than one byte but no tokenizer.ggml.merges; the file is incomplete")

    def token_id(key: str) -> int | None:
        value = header.metadata.get(key)
        return value if isinstance(value, int) and 0 <= value < len(tokens) else None

    return GGUFTokenizer(
        ranks,
        specials,
        PRE_TOKENIZERS[pre],
        name=str(header.metadata.get("general.name", header.path.stem)),
        chat_template=header.metadata.get("tokenizer.chat_template"),
        bos_id=token_id("tokenizer.ggml.bos_token_id"),
        eos_id=token_id("tokenizer.ggml.eos_token_id"),
    )


def _ranks_and_specials(tokens: list[str], types: list[int], merges: list[str], where: str):
    """Normal tokens -> ranks (their bytes), every other type -> special tokens (matched whole in text).

    tiktoken merges the pair whose *result* has the lowest id; the file's merges are in priority order.
    The two agree when each merge makes a new token with a higher id than the merge before; otherwise
    dozero would silently encode differently, so it refuses."""
    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}

    def to_bytes(token: str) -> bytes:
        if all(c in byte_decoder for c in token):
            return bytes(byte_decoder[c] for c in token)
        return token.encode("utf-8")  # a token written as plain text (as transformers reads it)

    ranks, specials = {}, {}
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind == NORMAL:
            ranks[to_bytes(token)] = i
        else:
            specials[token] = i
    ids = {token: i for i, token in enumerate(tokens)}
    last = -1
    for n, merge in enumerate(merges):
        a, sep, b = merge.partition(" ")
        i = ids.get(a + b)
        if not sep or i is None or i <= last:
            raise DozeroError(
                f"{where}: merge {n} ({merge!r}) is malformed, makes no token or is out of id order; "
                "dozero needs ids that follow the merge order (as GPT-2-style vocabularies have)"
            )
        last = i
    return ranks, specials


def read_gguf_tokenizer(path: str | os.PathLike) -> BPETokenizer:
    return tokenizer_from_gguf(read_gguf_header(path))


def tokenizer_metadata(tok: BPETokenizer) -> dict:
    """The tokenizer.ggml.* metadata that describes `tok` (for export): llama.cpp and transformers read it."""
    from dozero.tokenizer.formats import ranks_to_merges

    if not isinstance(tok, BPETokenizer):
        raise DozeroError(
            f"GGUF (llama.cpp) stores byte-level BPE vocabularies and this tokenizer is {tok.kind!r}, which "
            "llama.cpp cannot read: convert --to hf instead, or train with a BPE tokenizer (e.g. --tokenizer gpt2)"
        )
    if tok.pattern not in PATTERN_NAMES:
        raise DozeroError("this tokenizer's pre-tokenization regex has no llama.cpp name (gpt-2, smollm)")
    encoder = bytes_to_unicode()
    tokens = [""] * tok.vocab_size
    types = [NORMAL] * tok.vocab_size
    for token, i in tok.ranks.items():
        if i < tok.vocab_size:  # not a GGUFTokenizer's stand-in for an absent byte
            tokens[i] = "".join(encoder[b] for b in token)
    for text, i in tok.special_tokens.items():
        tokens[i], types[i] = text, CONTROL
    ranks = {t: i for t, i in tok.ranks.items() if i < tok.vocab_size}
    merges = [" ".join("".join(encoder[b] for b in part) for part in pair) for pair in ranks_to_merges(ranks)]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": PATTERN_NAMES[tok.pattern],
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    bos = getattr(tok, "bos_id", None)
    if tok.eot_id is not None:
        meta["tokenizer.ggml.eos_token_id"] = tok.eot_id
        meta["tokenizer.ggml.bos_token_id"] = tok.eot_id if bos is None else bos  # GPT-2 uses <|endoftext|> for both
    if getattr(tok, "chat_template", None):
        meta["tokenizer.chat_template"] = tok.chat_template
    return meta


def gguf_writer(path: str | os.PathLike, arch: str):
    """gguf-py's `GGUFWriter`, except that an empty metadata array is written (count 0), not dropped. GGUF
    allows one and llama.cpp needs it: a vocabulary without merges (single bytes and special tokens) must
    still carry tokenizer.ggml.merges, or llama.cpp refuses the file ("cannot find tokenizer merges")."""
    from gguf import GGUFValueType, GGUFWriter

    class Writer(GGUFWriter):
        def add_array(self, key: str, val) -> None:
            self.add_key_value(key, val, GGUFValueType.ARRAY, None if len(val) else GGUFValueType.STRING)

        def _pack_val(self, val, vtype, add_vtype: bool, sub_type=None) -> bytes:
            if vtype != GGUFValueType.ARRAY or len(val):
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            kind = self._pack("I", vtype) if add_vtype else b""  # then item type, count 0, no items
            return kind + self._pack("I", sub_type or GGUFValueType.STRING) + self._pack("Q", 0)

    return Writer(str(path), arch=arch)


def add_metadata(writer, meta: dict) -> None:
    """Write a metadata dict with a GGUFWriter: the value types llama.cpp expects. An empty list is written
    by a `gguf_writer` and dropped by gguf-py's own (which llama.cpp refuses for the merges; dozero reads it)."""
    for key, value in meta.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:  # a list: gguf stores int items as int32 (token types), str items as strings
            writer.add_array(key, value)


def write_gguf_tokenizer(tok: BPETokenizer, path: Path) -> None:
    """A vocabulary-only GGUF (metadata, no tensors), as llama.cpp's ggml-vocab-*.gguf files: how a model
    folder converted from GGUF keeps the tokenizer exactly (pre-tokenizer, chat template, end id)."""
    from dozero.files import atomic_path

    with atomic_path(path) as tmp:
        writer = gguf_writer(tmp, arch="vocab")
        writer.add_type("vocab")
        add_metadata(writer, tokenizer_metadata(tok))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def write_hf_tokenizer(tok: GGUFTokenizer, folder: Path, model_max_length: int | None = None) -> list[Path]:
    """tokenizer.json + tokenizer_config.json that transformers' AutoTokenizer reads with the GGUF file's ids:
    its pre-tokenizer as `tokenizers` spells it ("smollm": Digits(individual) then ByteLevel, as SmolLM2's own
    tokenizer.json), every token in the vocabulary, the control tokens as special, the end token and the chat
    template. (dozero.tokenizer.exports writes GPT-2-pattern tokenizers; this one covers GGUF's others too.)"""
    import json

    from dozero.files import atomic_write

    meta = tokenizer_metadata(tok)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    pre = byte_level
    if tok.pattern == SMOLLM_PATTERN:
        pre = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for i, (t, kind) in enumerate(zip(tokens, types, strict=True)) if kind != NORMAL
    ]  # fmt: skip
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
             "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
             "vocab": {t: i for i, t in enumerate(tokens)},
             "merges": [m.split(" ") for m in meta["tokenizer.ggml.merges"]]}  # fmt: skip
    tokenizer_json = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                      "normalizer": None, "pre_tokenizer": pre, "post_processor": byte_level,
                      "decoder": byte_level, "model": model}  # fmt: skip
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for key, value in (("bos_token", tok.bos_id), ("eos_token", tok.eot_id)):
        if value is not None:
            config[key] = tokens[value]
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    atomic_write(folder / "tokenizer.json", json.dumps(tokenizer_json, ensure_ascii=False, indent=1))
    atomic_write(folder / "tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=1) + "\n")
    return [folder / "tokenizer.json", folder / "tokenizer_config.json"]
