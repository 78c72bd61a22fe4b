"""Gemma's tokenizer: sentencepiece BPE with byte fallback, built from a tokenizer.model or a GGUF file.

Two views of one vocabulary are kept:

* the *canonical* ModelProto keeps each piece's true type (CONTROL for <bos>, <start_of_turn>, ...).
  It is what `save()` writes and what `from_file()` reads, so the set of special tokens survives a
  save/load round trip and the file is an ordinary sentencepiece model.
* the *working* ModelProto, which the C++ processor runs, has every CONTROL piece turned into
  USER_DEFINED: sentencepiece never matches CONTROL pieces in text, but Gemma's reference tokenizer
  turns a literal "<start_of_turn>" (or "<bos>", "<unused7>", ...) into that single token. It also
  makes `decode(..., skip_special_tokens=False)` print those pieces instead of dropping them.

Only the UNKNOWN piece (<unk>) cannot change type (sentencepiece requires exactly one); a literal
"<unk>" in text is split out in Python so it still encodes as the single unk id.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

__all__ = [
    "ChatMessage",
    "IncrementalDetokenizer",
    "Tokenizer",
    "TokenizerError",
    "model_proto_from_gguf_metadata",
    "read_gguf_metadata",
]

_Piece = sp_pb2.ModelProto.SentencePiece
_NORMAL, _UNKNOWN, _CONTROL = _Piece.NORMAL, _Piece.UNKNOWN, _Piece.CONTROL
_USER_DEFINED, _UNUSED, _BYTE = _Piece.USER_DEFINED, _Piece.UNUSED, _Piece.BYTE

_SPACE = "\u2581"  # sentencepiece's visible space, "▁"
_REPLACEMENT = "\ufffd"

# Chat template vocabulary (Gemma's): "assistant" is accepted as an alias of "model".
_CHAT_ROLES = ("system", "user", "model", "assistant")
_START_OF_TURN = "<start_of_turn>"
_END_OF_TURN = "<end_of_turn>"


class TokenizerError(ValueError):
    """A tokenizer file or GGUF metadata that cannot be turned into a working tokenizer."""


class ChatMessage(Protocol):
    """Anything with `.role` and `.content` strings (e.g. the gRPC ChatMessage); dicts work too."""

    role: str
    content: str


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


class Tokenizer:
    """Gemma tokenizer: encode/decode text, render chats, and know the special token ids."""

    def __init__(self, model: sp_pb2.ModelProto):
        """Wrap a canonical sentencepiece ModelProto (control pieces typed CONTROL); prefer from_file/from_gguf."""
        _check_supported(model)
        self._canonical = model
        self._sp = _load_processor(_working_proto(model))

        self.vocab_size: int = len(model.pieces)
        self.unk_id: int = _find_unknown(model)
        self.bos_id: int = self._required_id(model.trainer_spec.bos_piece, "bos")
        self.eos_id: int = self._required_id(model.trainer_spec.eos_piece, "eos")
        self.pad_id: int = self._required_id(model.trainer_spec.pad_piece, "pad")
        self.start_of_turn_id: int | None = self._piece_id(_START_OF_TURN)
        self.end_of_turn_id: int | None = self._piece_id(_END_OF_TURN)
        self._special_ids = self._collect_special_ids(model)

        self._unk_piece = model.pieces[self.unk_id].piece
        self._unk_surface = self._unk_piece  # what _working_proto told sentencepiece to print
        self._byte_values = {
            i: int(p.piece[3:5], 16) for i, p in enumerate(model.pieces) if p.type == _BYTE
        }
        # sentencepiece drops one leading "▁" from the first piece only under these options.
        spec = model.normalizer_spec
        self._strips_leading_space = spec.add_dummy_prefix or spec.remove_extra_whitespaces
        self._removes_extra_whitespaces = spec.remove_extra_whitespaces
        self._surfaces: dict[int, str] = {}  # id -> its unstripped surface, filled as ids are detokenized

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a serialized sentencepiece model (tokenizer.model)."""
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise TokenizerError(f"tokenizer model not found: {path}") from None
        except OSError as e:
            raise TokenizerError(f"cannot read tokenizer model {path}: {e}") from e
        model = sp_pb2.ModelProto()
        try:
            model.ParseFromString(data)
        except Exception as e:  # protobuf raises DecodeError; anything else is the same failure.
            raise TokenizerError(f"{path} is not a sentencepiece model: {e}") from e
        if not model.pieces:
            raise TokenizerError(f"{path} is not a sentencepiece model: it has no pieces")
        return cls(model)

    @classmethod
    def from_gguf(cls, path_or_reader: Any) -> Tokenizer:
        """Build the tokenizer from a GGUF file's `tokenizer.ggml.*` metadata (path or gguf.GGUFReader)."""
        if isinstance(path_or_reader, (str, os.PathLike)):
            metadata = read_gguf_metadata(path_or_reader)
            where = os.fspath(path_or_reader)
        elif hasattr(path_or_reader, "fields"):
            metadata = _metadata_from_reader(path_or_reader)
            where = str(getattr(path_or_reader.data, "filename", None) or "GGUFReader")
        else:
            raise TypeError(f"from_gguf needs a path or a gguf.GGUFReader, got {type(path_or_reader).__name__}")
        return cls(model_proto_from_gguf_metadata(metadata, where=where))

    def save(self, path: str | os.PathLike) -> None:
        """Write the serialized sentencepiece model (tokenizer.model); `from_file` reads it back."""
        with open(path, "wb") as f:
            f.write(self._canonical.SerializeToString())

    def _collect_special_ids(self, model: sp_pb2.ModelProto) -> frozenset[int]:
        """CONTROL and UNKNOWN pieces, plus bos/eos/pad and the turn markers whatever their type.

        Gemma's Hugging Face config marks <start_of_turn>/<end_of_turn> special even in a .model that
        types them USER_DEFINED; skip_special_tokens must drop them either way.
        """
        ids = {i for i, p in enumerate(model.pieces) if p.type in (_CONTROL, _UNKNOWN)}
        ids |= {self.bos_id, self.eos_id, self.pad_id}
        ids |= {i for i in (self.start_of_turn_id, self.end_of_turn_id) if i is not None}
        return frozenset(ids)

    def _required_id(self, piece: str, name: str) -> int:
        token_id = self._piece_id(piece)
        if token_id is None:
            raise TokenizerError(f"trainer_spec.{name}_piece {piece!r} is not in the vocabulary")
        return token_id

    def _piece_id(self, piece: str) -> int | None:
        # PieceToId answers unk_id for a missing piece, so confirm by looking the id back up.
        token_id = self._sp.piece_to_id(piece)
        return token_id if self._canonical.pieces[token_id].piece == piece else None

    # -- encode / decode ------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, with <bos> first when `add_bos`."""
        if not isinstance(text, str):
            raise TypeError(f"encode needs a str, got {type(text).__name__}")
        ids = [self.bos_id] if add_bos else []
        if self._unk_piece in text:
            # <unk> must stay UNKNOWN-typed, so sentencepiece would spell it out; split it out here.
            parts = text.split(self._unk_piece)
            for k, part in enumerate(parts):
                if k:
                    ids.append(self.unk_id)
                ids.extend(self._sp.encode(part))
            return ids
        ids.extend(self._sp.encode(text))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are dropped when `skip_special_tokens`, else printed as pieces."""
        ids = self._checked_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._sp.decode(ids)

    def id_to_piece(self, id: int) -> str:
        """The vocabulary entry for `id` (spaces appear as "▁", raw bytes as "<0xNN>")."""
        self._checked_ids([id])
        return self._sp.id_to_piece(int(id))

    def is_special(self, id: int) -> bool:
        """Whether `id` is a control token (<bos>, <eos>, <pad>, <unk>, <start_of_turn>, <unusedN>, ...)."""
        return id in self._special_ids

    def stop_token_ids(self, chat: bool) -> frozenset[int]:
        """Ids that end a generation: <eos>, and for chat also <end_of_turn>."""
        if chat and self.end_of_turn_id is not None:
            return frozenset((self.eos_id, self.end_of_turn_id))
        return frozenset((self.eos_id,))

    def _checked_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is out of range [0, {self.vocab_size})")
        return ids

    # -- chat -----------------------------------------------------------------------------------

    def render_chat(
        self,
        messages: Sequence[Mapping[str, str]] | Sequence[ChatMessage],
        add_generation_prompt: bool = True,
    ) -> str:
        """Gemma chat template text for `messages`, without the leading <bos>."""
        turns = _chat_turns(_validated_messages(messages))
        text = "".join(f"{_START_OF_TURN}{role}\n{content}{_END_OF_TURN}\n" for role, content in turns)
        if add_generation_prompt:
            text += f"{_START_OF_TURN}model\n"
        return text

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, str]] | Sequence[ChatMessage],
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """<bos> followed by the ids of `render_chat(messages)`."""
        return [self.bos_id] + self.encode(self.render_chat(messages, add_generation_prompt), add_bos=False)

    # -- used by IncrementalDetokenizer -------------------------------------------------------

    def _byte_value(self, token_id: int) -> int | None:
        return self._byte_values.get(token_id)

    def _piece_surface(self, token_id: int, strip_leading_space: bool) -> tuple[str, bool]:
        """(text, stripped) for one non-byte piece, exactly as sentencepiece's decoder spells it."""
        if not strip_leading_space:  # every piece after the first: one dict lookup per token
            surface = self._surfaces.get(token_id)
            if surface is None:
                surface = self._surfaces[token_id] = self._plain_surface(token_id)
            return surface, False
        piece = self._sp.id_to_piece(token_id)
        if self._sp.is_control(token_id) or self._sp.is_unknown(token_id) or not self._strips_leading_space \
                or not piece.startswith(_SPACE):
            return self._plain_surface(token_id), False
        # With remove_extra_whitespaces every leading "▁" goes, so sentencepiece keeps looking.
        return piece[1:].replace(_SPACE, " "), not self._removes_extra_whitespaces

    def _plain_surface(self, token_id: int) -> str:
        """One non-byte piece's text when no leading space is stripped."""
        if self._sp.is_control(token_id):
            return ""
        if self._sp.is_unknown(token_id):
            return self._unk_surface
        return self._sp.id_to_piece(token_id).replace(_SPACE, " ")


# ---------------------------------------------------------------------------------------------
# Chat template
# ---------------------------------------------------------------------------------------------


def _validated_messages(messages: Any) -> list[tuple[str, str]]:
    """[(role, content)] with roles checked; raises ValueError naming the offending field."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages: expected a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages: empty; a chat needs at least one message")
    checked = []
    for i, message in enumerate(messages):
        role = _message_field(message, "role", i)
        content = _message_field(message, "content", i)
        if role not in _CHAT_ROLES:
            raise ValueError(
                f"messages[{i}].role: unknown role {role!r}; expected one of {', '.join(_CHAT_ROLES)}"
            )
        if role == "system" and i > 0:
            # Gemma has no system turn; the template can only fold a *leading* system message into the first turn.
            raise ValueError(f"messages[{i}].role: a 'system' message is only allowed first")
        checked.append(("model" if role == "assistant" else role, content))
    return checked


def _message_field(message: Any, name: str, index: int) -> str:
    if isinstance(message, Mapping):
        value = message.get(name)
    else:
        value = getattr(message, name, None)
    if value is None:
        raise ValueError(f"messages[{index}].{name}: missing")
    if not isinstance(value, str):
        raise ValueError(f"messages[{index}].{name}: expected a string, got {type(value).__name__}")
    return value


def _chat_turns(messages: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(role, text) per rendered turn, following Gemma 3's template.

    A leading system message is not a turn: its content (unstripped) plus a blank line is prepended
    to the first following turn's stripped content. With nothing following, it becomes a user turn
    rather than silently vanishing (the Hugging Face template drops it).
    """
    prefix = ""
    if messages[0][0] == "system":
        prefix = messages[0][1] + "\n\n"
        messages = messages[1:]
        if not messages:
            return [("user", prefix.strip())]
    turns = []
    for k, (role, content) in enumerate(messages):
        turns.append((role, (prefix if k == 0 else "") + content.strip()))
    return turns


# ---------------------------------------------------------------------------------------------
# Incremental detokenizer
# ---------------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turn a stream of token ids into text deltas that never split a UTF-8 character.

    Mirrors sentencepiece's decoder piece by piece: a run of byte-fallback pieces (<0xE6><0x97><0xA5>)
    is decoded one character at a time, greedily, and a byte that cannot start a valid character
    becomes U+FFFD. Bytes that might still complete a character are held back until they do, or
    until a non-byte piece (or `flush`) proves they cannot. Hence the concatenation of all deltas
    equals `tokenizer.decode(all_ids, skip_special_tokens)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        """Start an empty stream over `tokenizer`."""
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._pending = bytearray()  # undecided bytes of the current byte-fallback run
        # sentencepiece strips a leading "▁" (add_dummy_prefix) only until the first text or strip.
        self._at_start = True
        self._bos_ws_seen = False
        self._parts: list[str] = []  # joined lazily: repeated `str +=` on an attribute is quadratic

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (may be "")."""
        token_id = int(token_id)
        if not 0 <= token_id < self._tok.vocab_size:
            raise ValueError(f"token id {token_id} is out of range [0, {self._tok.vocab_size})")
        if self._skip and token_id in self._tok._special_ids:
            # decode() filters these out before sentencepiece sees them, so a byte run continues across them.
            return ""
        byte = self._tok._byte_values.get(token_id)
        if byte is not None:
            self._pending.append(byte)
            return self._emit(self._drain_bytes(final=False))
        delta = self._drain_bytes(final=True) if self._pending else ""
        if self._bos_ws_seen or self._parts or delta:
            self._at_start = False
        surface, self._bos_ws_seen = self._tok._piece_surface(token_id, self._at_start)
        return self._emit(delta + surface)

    def flush(self) -> str:
        """End of stream: emit any held-back bytes (as U+FFFD when they never formed a character)."""
        return self._emit(self._drain_bytes(final=True))

    def _emit(self, delta: str) -> str:
        if delta:
            self._parts.append(delta)
        return delta

    def _drain_bytes(self, final: bool) -> str:
        """Decode whole characters off the front of the pending bytes; with `final`, decode everything."""
        out = []
        pending = self._pending
        while pending:
            size = _utf8_length(pending[0])
            if size > len(pending):
                if not final:
                    break  # might still become a character
                size = 0  # the run ended mid-character: the lead byte is invalid
            if size and _is_valid_utf8_char(pending[:size]):
                out.append(pending[:size].decode("utf-8"))
                del pending[:size]
            else:
                out.append(_REPLACEMENT)
                del pending[:1]  # like sentencepiece: skip one byte and resynchronise
        return "".join(out)


def _utf8_length(lead: int) -> int:
    """Bytes in the character that `lead` starts (0 when it cannot start one)."""
    if lead < 0x80:
        return 1
    if 0xC0 <= lead < 0xE0:
        return 2
    if 0xE0 <= lead < 0xF0:
        return 3
    if 0xF0 <= lead < 0xF8:
        return 4
    return 0


def _is_valid_utf8_char(data: bytes | bytearray) -> bool:
    # Python's strict decoder rejects overlongs, surrogates and > U+10FFFF, as sentencepiece does.
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# ModelProto building and checking
# ---------------------------------------------------------------------------------------------


def _check_supported(model: sp_pb2.ModelProto) -> None:
    """Reject models whose decoding the incremental detokenizer could not mirror exactly."""
    if model.denormalizer_spec.precompiled_charsmap:
        raise TokenizerError("sentencepiece models with a denormalizer are not supported")
    if model.trainer_spec.model_type not in (sp_pb2.TrainerSpec.BPE, sp_pb2.TrainerSpec.UNIGRAM):
        raise TokenizerError(
            f"unsupported sentencepiece model_type {model.trainer_spec.model_type}; expected BPE or UNIGRAM"
        )


def _find_unknown(model: sp_pb2.ModelProto) -> int:
    unknown = [i for i, p in enumerate(model.pieces) if p.type == _UNKNOWN]
    if len(unknown) != 1:
        raise TokenizerError(f"a sentencepiece model needs exactly one UNKNOWN piece, found {len(unknown)}")
    return unknown[0]


def _working_proto(model: sp_pb2.ModelProto) -> sp_pb2.ModelProto:
    """Copy of `model` with CONTROL pieces made USER_DEFINED, so text can spell them."""
    working = sp_pb2.ModelProto()
    working.CopyFrom(model)
    for piece in working.pieces:
        if piece.type == _CONTROL:
            piece.type = _USER_DEFINED
    # Decode <unk> as its piece like every other special token (and like Hugging Face), not as " ⁇ ".
    working.trainer_spec.unk_surface = working.pieces[_find_unknown(model)].piece
    return working


def _load_processor(model: sp_pb2.ModelProto) -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_proto=model.SerializeToString())
    except Exception as e:  # sentencepiece reports a bad proto as RuntimeError/OSError
        raise TokenizerError(f"sentencepiece rejected the model: {e}") from e


def model_proto_from_gguf_metadata(metadata: Mapping[str, Any], where: str = "GGUF") -> sp_pb2.ModelProto:
    """The canonical sentencepiece ModelProto described by GGUF `tokenizer.ggml.*` metadata."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "llama":
        raise TokenizerError(
            f"{where}: tokenizer.ggml.model is {kind!r}; only 'llama' (sentencepiece) is supported"
        )
    tokens = _gguf_required(metadata, "tokenizer.ggml.tokens", where)
    scores = _gguf_required(metadata, "tokenizer.ggml.scores", where)
    types = _gguf_required(metadata, "tokenizer.ggml.token_type", where)
    n = len(tokens)
    if len(scores) != n or len(types) != n:
        raise TokenizerError(
            f"{where}: tokenizer.ggml.tokens/scores/token_type lengths differ ({n}, {len(scores)}, {len(types)})"
        )
    special = {
        name: _gguf_token_id(metadata, f"tokenizer.ggml.{key}_token_id", n, where)
        for name, key in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
    }

    model = sp_pb2.ModelProto()
    _add_gguf_pieces(model, tokens, scores, types, special["unk"], where)
    _set_trainer_spec(model.trainer_spec, model, n, special)
    # Absent means True: llama.cpp's default for sentencepiece vocabularies. Gemma's files say False.
    _set_normalizer_spec(model.normalizer_spec, bool(metadata.get("tokenizer.ggml.add_space_prefix", True)))
    return model


def _add_gguf_pieces(model, tokens, scores, types, unk_id: int, where: str) -> None:
    valid_types = {_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE}  # same numbering as GGUF
    seen: set[str] = set()
    for i, (token, score, token_type) in enumerate(zip(tokens, scores.tolist(), types.tolist())):
        if token_type not in valid_types:
            raise TokenizerError(f"{where}: tokenizer.ggml.token_type[{i}] = {token_type} is not a known type")
        if token_type != _BYTE:
            # llama.cpp matches user-defined pieces against raw text, so runs of spaces are stored as
            # real spaces; sentencepiece matches against escaped text, where a space is "▁".
            token = token.replace(" ", _SPACE)
        if i == unk_id:
            token_type = _UNKNOWN  # the GGUF may call <unk> CONTROL; sentencepiece needs it UNKNOWN
        elif token_type == _UNKNOWN:
            token_type = _CONTROL  # only one UNKNOWN allowed; keep any other one special
        if not token or token in seen:
            raise TokenizerError(f"{where}: tokenizer.ggml.tokens[{i}] {token!r} is empty or duplicated")
        seen.add(token)
        model.pieces.add(piece=token, score=score, type=token_type)


def _set_trainer_spec(spec, model, vocab_size: int, special: Mapping[str, int]) -> None:
    spec.model_type = sp_pb2.TrainerSpec.BPE
    spec.vocab_size = vocab_size
    spec.byte_fallback = True
    for name, token_id in special.items():
        setattr(spec, f"{name}_id", token_id)
        setattr(spec, f"{name}_piece", model.pieces[token_id].piece)


def _set_normalizer_spec(spec, add_space_prefix: bool) -> None:
    spec.name = "identity"  # no NFKC: Gemma tokenizes the text exactly as given
    spec.precompiled_charsmap = b""
    spec.add_dummy_prefix = add_space_prefix
    spec.remove_extra_whitespaces = False
    spec.escape_whitespaces = True


def _gguf_required(metadata: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in metadata:
        raise TokenizerError(f"{where}: GGUF metadata has no {key}")
    value = metadata[key]
    return value if key == "tokenizer.ggml.tokens" else np.asarray(value)


def _gguf_token_id(metadata: Mapping[str, Any], key: str, n: int, where: str) -> int:
    value = metadata.get(key)
    if value is None:
        raise TokenizerError(f"{where}: GGUF metadata has no {key}")
    if not 0 <= int(value) < n:
        raise TokenizerError(f"{where}: {key} = {value} is outside the vocabulary of {n}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# GGUF metadata reading
# ---------------------------------------------------------------------------------------------

# GGUF value type -> (struct code, numpy dtype); 8 is STRING and 9 is ARRAY.
_GGUF_SCALARS = {
    0: ("B", np.uint8), 1: ("b", np.int8), 2: ("H", np.uint16), 3: ("h", np.int16),
    4: ("I", np.uint32), 5: ("i", np.int32), 6: ("f", np.float32), 7: ("?", np.bool_),
    10: ("Q", np.uint64), 11: ("q", np.int64), 12: ("d", np.float64),
}  # fmt: skip
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All key/value metadata of a GGUF file (string arrays as lists, numeric arrays as numpy).

    gguf.GGUFReader also indexes every tensor and wraps each of the 262k vocabulary strings in its
    own object (~12 s here); reading only the key/value section takes a fraction of a second.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < 4:
                raise TokenizerError(f"{path}: not a GGUF file (only {os.fstat(f.fileno()).st_size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _GGUFMetadataParser(buf, path).parse()
    except FileNotFoundError:
        raise TokenizerError(f"GGUF file not found: {path}") from None
    except TokenizerError:
        raise
    except (struct.error, ValueError, IndexError) as e:  # reads past the end, bad UTF-8, unknown types
        raise TokenizerError(f"{path}: truncated or corrupt GGUF metadata ({e})") from e


class _GGUFMetadataParser:
    """Sequential reader of a GGUF header: magic, version, tensor count, then key/value pairs."""

    def __init__(self, buf: mmap.mmap, where: str):
        self._buf = buf
        self._where = where
        self._pos = 0
        self._endian = "<"

    def parse(self) -> dict[str, Any]:
        if self._buf[:4] != b"GGUF":
            raise TokenizerError(f"{self._where}: not a GGUF file (bad magic {bytes(self._buf[:4])!r})")
        self._pos = 4
        version = self._scalar("I")
        if version & 0xFFFF == 0:  # a big-endian file read as little-endian
            self._endian = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version < 2:
            raise TokenizerError(f"{self._where}: GGUF version {version} is too old (need 2 or later)")
        self._scalar("Q")  # tensor count: not needed for metadata
        return {self._string(): self._value(self._scalar("I")) for _ in range(self._scalar("Q"))}

    def _scalar(self, code: str) -> Any:
        (value,) = struct.unpack_from(self._endian + code, self._buf, self._pos)
        self._pos += struct.calcsize(code)
        return value

    def _string(self) -> str:
        size = self._scalar("Q")
        raw = self._buf[self._pos : self._pos + size]
        if len(raw) != size:
            raise ValueError("string runs past the end of the file")
        self._pos += size
        return raw.decode("utf-8")

    def _value(self, value_type: int) -> Any:
        if value_type == _GGUF_STRING:
            return self._string()
        if value_type == _GGUF_ARRAY:
            return self._array(self._scalar("I"), self._scalar("Q"))
        if value_type in _GGUF_SCALARS:
            return self._scalar(_GGUF_SCALARS[value_type][0])
        raise ValueError(f"unknown GGUF value type {value_type}")

    def _array(self, item_type: int, count: int) -> Any:
        if item_type == _GGUF_STRING:
            return [self._string() for _ in range(count)]
        if item_type in _GGUF_SCALARS:
            dtype = np.dtype(_GGUF_SCALARS[item_type][1]).newbyteorder(self._endian)
            values = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._pos).copy()
            self._pos += values.nbytes
            return values.astype(values.dtype.newbyteorder("="))
        return [self._value(item_type) for _ in range(count)]  # arrays of arrays: rare, small


def _metadata_from_reader(reader: Any) -> dict[str, Any]:
    """The `tokenizer.*` metadata of an already-open gguf.GGUFReader, in read_gguf_metadata's shapes."""
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        if len(field.types) > 1 and field.types[1] == _GGUF_STRING:  # array of strings: one part each
            metadata[key] = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        elif len(field.types) > 1:  # numeric array: one part per element
            metadata[key] = np.array([field.parts[i][0] for i in field.data])
        else:
            metadata[key] = field.contents()
    return metadata
