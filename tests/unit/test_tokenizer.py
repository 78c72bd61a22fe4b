"""Fast tokenizer tests on a tiny hand-built sentencepiece vocabulary (no real GGUF needed)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import gguf
import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from gemma_dist.tokenizer import (
    IncrementalDetokenizer,
    Tokenizer,
    TokenizerError,
    model_proto_from_gguf_metadata,
    read_gguf_metadata,
)

Piece = sp_pb2.ModelProto.SentencePiece
SPACE = "\u2581"

# Gemma's layout in miniature: specials first, then user-defined whitespace, then the 256 byte pieces.
SPECIALS = [
    ("<pad>", Piece.CONTROL),
    ("<eos>", Piece.CONTROL),
    ("<bos>", Piece.CONTROL),
    ("<unk>", Piece.UNKNOWN),
    ("<mask>", Piece.CONTROL),
    ("<start_of_turn>", Piece.CONTROL),
    ("<end_of_turn>", Piece.CONTROL),
    ("\n", Piece.USER_DEFINED),
    (SPACE * 2, Piece.USER_DEFINED),
]
BYTE_OFFSET = len(SPECIALS)
WORDS = [SPACE, "he", "ll", "hell", "hello", SPACE + "w", SPACE + "wo", SPACE + "wor", SPACE + "worl", SPACE + "world",
         "us", "er", "user", "mo", "mod", "mode", "model"]
LETTERS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?:;'-()")
BOS, EOS, PAD, UNK, START_OF_TURN, END_OF_TURN = 2, 1, 0, 3, 5, 6


def byte_id(value: int) -> int:
    return BYTE_OFFSET + value


def tiny_proto(add_dummy_prefix: bool = False, remove_extra_whitespaces: bool = False) -> sp_pb2.ModelProto:
    """A Gemma-shaped BPE model with byte fallback: é, 日, 🤗 are not in it and fall back to bytes."""
    model = sp_pb2.ModelProto()
    for piece, kind in SPECIALS:
        model.pieces.add(piece=piece, type=kind, score=0.0)
    for value in range(256):
        model.pieces.add(piece=f"<0x{value:02X}>", type=Piece.BYTE, score=0.0)
    for rank, piece in enumerate(WORDS + LETTERS):
        model.pieces.add(piece=piece, type=Piece.NORMAL, score=-float(rank))
    spec = model.trainer_spec
    spec.model_type = sp_pb2.TrainerSpec.BPE
    spec.vocab_size = len(model.pieces)
    spec.byte_fallback = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = UNK, BOS, EOS, PAD
    spec.unk_piece, spec.bos_piece, spec.eos_piece, spec.pad_piece = "<unk>", "<bos>", "<eos>", "<pad>"
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.precompiled_charsmap = b""
    norm.add_dummy_prefix = add_dummy_prefix
    norm.remove_extra_whitespaces = remove_extra_whitespaces
    norm.escape_whitespaces = True
    return model


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(tiny_proto().SerializeToString())
    return Tokenizer.from_file(path)


# -- loading -----------------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(TokenizerError, match="not found.*nope/tokenizer.model"):
        Tokenizer.from_file(missing)


def test_garbage_file_is_a_tokenizer_error(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\xff\xfe not a protobuf \x00\x01")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        Tokenizer.from_file(path)


def test_special_ids_and_vocab(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (BOS, EOS, PAD)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (START_OF_TURN, END_OF_TURN)
    assert tok.vocab_size == len(tiny_proto().pieces)
    assert all(tok.is_special(i) for i in (PAD, EOS, BOS, UNK, 4, START_OF_TURN, END_OF_TURN))
    assert not tok.is_special(7)  # "\n" is user-defined, not special
    assert not tok.is_special(byte_id(0x41))
    assert tok.id_to_piece(8) == SPACE * 2
    assert tok.id_to_piece(byte_id(0xE6)) == "<0xE6>"


def test_turn_markers_are_optional(tmp_path):
    model = tiny_proto()
    model.pieces[START_OF_TURN].piece = "<reserved0>"
    model.pieces[END_OF_TURN].piece = "<reserved1>"
    path = tmp_path / "t.model"
    path.write_bytes(model.SerializeToString())
    t = Tokenizer.from_file(path)
    assert t.start_of_turn_id is None and t.end_of_turn_id is None
    assert t.stop_token_ids(chat=True) == frozenset({EOS})


def test_save_round_trip_keeps_control_types(tok, tmp_path):
    path = tmp_path / "saved.model"
    tok.save(path)
    again = Tokenizer.from_file(path)
    text = "<start_of_turn>user\nhello world é<end_of_turn>"
    assert again.encode(text) == tok.encode(text)
    assert [again.is_special(i) for i in range(tok.vocab_size)] == [tok.is_special(i) for i in range(tok.vocab_size)]
    saved = sp_pb2.ModelProto.FromString(path.read_bytes())
    assert saved.pieces[START_OF_TURN].type == Piece.CONTROL  # the file stays an ordinary sentencepiece model


# -- encode / decode ---------------------------------------------------------------------------


def test_encode_adds_bos_and_merges_words(tok):
    ids = tok.encode("hello world")
    assert ids[0] == BOS
    assert [tok.id_to_piece(i) for i in ids[1:]] == ["hello", SPACE + "world"]
    assert tok.encode("hello world", add_bos=False) == ids[1:]
    assert tok.encode("") == [BOS]


def test_control_tokens_in_text_encode_as_single_tokens(tok):
    ids = tok.encode("<start_of_turn>user\nhi<end_of_turn><eos><bos><pad>", add_bos=False)
    assert ids[:3] == [START_OF_TURN, tok.encode("user", add_bos=False)[0], 7]
    assert ids[-4:] == [END_OF_TURN, EOS, BOS, PAD]


def test_unk_piece_in_text_encodes_as_unk(tok):
    ids = tok.encode("a<unk>b<unk>", add_bos=False)
    assert ids == [tok.encode("a", add_bos=False)[0], UNK, tok.encode("b", add_bos=False)[0], UNK]
    assert tok.decode(ids, skip_special_tokens=False) == "a<unk>b<unk>"
    assert tok.decode(ids) == "ab"


def test_byte_fallback_round_trips_unknown_characters(tok):
    text = "hello é 日本 🤗 \t end"
    ids = tok.encode(text)
    assert byte_id(0xE6) in ids  # 日 = E6 97 A5
    assert tok.decode(ids) == text


def test_whitespace_is_preserved(tok):
    for text in ["  a", "a  ", "a     b", "\n\n a \n", " "]:
        assert tok.decode(tok.encode(text)) == text


def test_decode_skip_special_tokens(tok):
    ids = [BOS, START_OF_TURN] + tok.encode("user\nhello", add_bos=False) + [END_OF_TURN, EOS, PAD]
    assert tok.decode(ids) == "user\nhello"
    assert tok.decode(ids, skip_special_tokens=False) == "<bos><start_of_turn>user\nhello<end_of_turn><eos><pad>"


def test_decode_rejects_out_of_range_ids(tok):
    with pytest.raises(ValueError, match="token id 99999 is out of range"):
        tok.decode([BOS, 99999])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])


def test_decode_accepts_numpy_ids(tok):
    ids = np.array(tok.encode("hello"), dtype=np.int64)
    assert tok.decode(ids) == "hello"


def test_encode_rejects_non_strings(tok):
    with pytest.raises(TypeError):
        tok.encode(["hello"])  # type: ignore[arg-type]


def test_stop_token_ids(tok):
    assert tok.stop_token_ids(chat=False) == frozenset({EOS})
    assert tok.stop_token_ids(chat=True) == frozenset({EOS, END_OF_TURN})


# -- chat template -----------------------------------------------------------------------------


@dataclass
class Msg:
    role: str
    content: str


def test_render_single_user_turn(tok):
    text = tok.render_chat([{"role": "user", "content": "  Hi there \n"}])
    assert text == "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"


def test_render_conversation_with_assistant_alias_and_no_generation_prompt(tok):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert tok.render_chat(messages, add_generation_prompt=False) == (
        "<start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
    )


def test_system_message_is_folded_into_first_user_turn(tok):
    messages = [Msg("system", "Be brief."), Msg("user", " What is 2+2? "), Msg("model", "4")]
    assert tok.render_chat(messages) == (
        "<start_of_turn>user\nBe brief.\n\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n4<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_lone_system_message_becomes_a_user_turn(tok):
    assert tok.render_chat([{"role": "system", "content": "Be brief."}]) == (
        "<start_of_turn>user\nBe brief.<end_of_turn>\n<start_of_turn>model\n"
    )


def test_encode_chat_is_bos_plus_rendered_text(tok):
    messages = [{"role": "user", "content": "hello"}]
    ids = tok.encode_chat(messages)
    assert ids == [BOS] + tok.encode(tok.render_chat(messages), add_bos=False)
    assert ids[1] == START_OF_TURN
    assert ids.count(START_OF_TURN) == 2 and ids.count(END_OF_TURN) == 1


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], r"messages: empty"),
        ("hello", r"messages: expected a list"),
        ([{"role": "user", "content": "a"}, {"role": "model", "content": "b"}, {"role": "bot", "content": "c"}],
         r"messages\[2\]\.role: unknown role 'bot'; expected one of system, user, model, assistant"),
        ([{"content": "hi"}], r"messages\[0\]\.role: missing"),
        ([{"role": "user"}], r"messages\[0\]\.content: missing"),
        ([Msg("user", None)], r"messages\[0\]\.content: missing"),  # type: ignore[arg-type]
        ([{"role": "user", "content": ["a"]}], r"messages\[0\]\.content: expected a string, got list"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
         r"messages\[1\]\.role: a 'system' message is only allowed first"),
        ([object()], r"messages\[0\]\.role: missing"),
    ],
)  # fmt: skip
def test_chat_validation_errors_name_the_field(tok, messages, error):
    with pytest.raises(ValueError, match=error):
        tok.render_chat(messages)


# -- incremental detokenizer -------------------------------------------------------------------


def stream(tok: Tokenizer, ids, skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text
    return deltas


def test_detokenizer_holds_split_characters_until_complete(tok):
    ids = tok.encode("a日🤗é b", add_bos=False)
    deltas = stream(tok, ids)
    assert "".join(deltas) == "a日🤗é b"
    assert all("\ufffd" not in d for d in deltas)
    # 日 arrives as three byte pieces: nothing, nothing, then the whole character.
    start = ids.index(byte_id(0xE6))
    assert deltas[start : start + 3] == ["", "", "日"]


def test_detokenizer_skips_special_tokens_inside_a_byte_run(tok):
    ids = [BOS, byte_id(0xE6), EOS, byte_id(0x97), byte_id(0xA5)]
    assert "".join(stream(tok, ids)) == tok.decode(ids) == "日"
    assert "".join(stream(tok, ids, skip_special_tokens=False)) == tok.decode(ids, skip_special_tokens=False)


def test_detokenizer_flush_emits_incomplete_bytes_as_replacement(tok):
    detok = IncrementalDetokenizer(tok)
    assert detok.push(byte_id(0xE6)) == ""
    assert detok.push(byte_id(0x97)) == ""
    assert detok.flush() == tok.decode([byte_id(0xE6), byte_id(0x97)]) == "\ufffd\ufffd"


def test_detokenizer_invalid_byte_then_text(tok):
    ids = [byte_id(0xE6), tok.encode("a", add_bos=False)[0]]
    assert "".join(stream(tok, ids)) == tok.decode(ids) == "\ufffda"


@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_matches_decode_on_random_ids(tok, skip):
    """Byte-heavy random streams (valid, truncated and invalid UTF-8) must decode exactly as decode() does."""
    rng = random.Random(1234)
    # Lead bytes, continuation bytes and the boundary values sentencepiece and UTF-8 care about.
    interesting = [0x00, 0x41, 0x7F, 0x80, 0xBF, 0xC0, 0xC2, 0xDF, 0xE0, 0xE6, 0xED, 0xEF, 0xF0, 0xF4, 0xF5, 0xFF,
                   0x97, 0xA5, 0x9F, 0xA4, 0x97, 0x8F, 0xBD]  # fmt: skip
    normal = [i for i in range(tok.vocab_size) if not tok.is_special(i) and i >= BYTE_OFFSET + 256]
    for _ in range(3000):
        ids = []
        for _ in range(rng.randrange(1, 10)):
            roll = rng.random()
            if roll < 0.55:
                ids.append(byte_id(rng.choice(interesting)))
            elif roll < 0.7:
                ids.extend(byte_id(b) for b in rng.choice(["日", "🤗", "é", "\u0800", "\U0010ffff"]).encode())
            elif roll < 0.85:
                ids.append(rng.choice(normal))
            else:
                ids.append(rng.choice([PAD, EOS, BOS, UNK, START_OF_TURN, 7, 8]))
        assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize("remove_extra_whitespaces", [False, True])
def test_detokenizer_matches_decode_with_dummy_prefix(tmp_path, remove_extra_whitespaces):
    """With add_dummy_prefix sentencepiece drops the first leading space; the stream must too."""
    path = tmp_path / "prefix.model"
    path.write_bytes(tiny_proto(True, remove_extra_whitespaces).SerializeToString())
    t = Tokenizer.from_file(path)
    assert t.decode(t.encode("hello world")) == "hello world"
    sequences = [t.encode(text) for text in ["hello world", " hello", "日 world", "<start_of_turn>user\nhello"]]
    space, two_spaces = BYTE_OFFSET + 256 + WORDS.index(SPACE), 8
    sequences += [[space, space, space], [two_spaces, space], [BOS, space, two_spaces], [byte_id(0x41), space]]
    for ids in sequences:
        for skip in (True, False):
            assert "".join(stream(t, ids, skip)) == t.decode(ids, skip_special_tokens=skip), ids


def test_detokenizer_rejects_out_of_range(tok):
    with pytest.raises(ValueError, match="out of range"):
        IncrementalDetokenizer(tok).push(tok.vocab_size)


# -- GGUF --------------------------------------------------------------------------------------


def gguf_vocab():
    """tokens/scores/types as llama.cpp writes them for Gemma: <unk> typed CONTROL, spaces literal."""
    tokens, types = [], []
    for piece, kind in SPECIALS:
        tokens.append(piece.replace(SPACE, " "))
        types.append(int(Piece.CONTROL if kind == Piece.UNKNOWN else kind))
    tokens += [f"<0x{v:02X}>" for v in range(256)]
    types += [int(Piece.BYTE)] * 256
    tokens += WORDS + LETTERS
    types += [int(Piece.NORMAL)] * (len(WORDS) + len(LETTERS))
    scores = [-1000.0] * len(SPECIALS) + [0.0] * 256 + [-float(r) for r in range(len(WORDS) + len(LETTERS))]
    return tokens, scores, types


def write_gguf(path, endianess=gguf.GGUFEndian.LITTLE, model="llama"):
    tokens, scores, types = gguf_vocab()
    writer = gguf.GGUFWriter(path, arch="gemma3", endianess=endianess)
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_unk_token_id(UNK)
    writer.add_pad_token_id(PAD)
    writer.add_add_space_prefix(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_from_gguf_path_matches_the_sentencepiece_model(tok, tmp_path, endianess):
    t = Tokenizer.from_gguf(write_gguf(tmp_path / "tiny.gguf", endianess))
    for text in ["hello world", "a  b", "<start_of_turn>user\nhello é<end_of_turn>", "x<unk>y", ""]:
        assert t.encode(text) == tok.encode(text)
    assert t.is_special(UNK) and t.is_special(START_OF_TURN) and not t.is_special(8)
    assert t.id_to_piece(8) == SPACE * 2  # the literal "  " was respelled so sentencepiece can match it


def test_from_gguf_reader(tok, tmp_path):
    reader = gguf.GGUFReader(write_gguf(tmp_path / "tiny.gguf"))
    t = Tokenizer.from_gguf(reader)
    assert t.encode("hello  world<end_of_turn>") == tok.encode("hello  world<end_of_turn>")


def test_read_gguf_metadata(tmp_path):
    metadata = read_gguf_metadata(write_gguf(tmp_path / "tiny.gguf"))
    assert metadata["general.architecture"] == "gemma3"
    assert metadata["tokenizer.ggml.model"] == "llama"
    assert metadata["tokenizer.ggml.tokens"][:3] == ["<pad>", "<eos>", "<bos>"]
    assert metadata["tokenizer.ggml.scores"].dtype == np.float32
    assert metadata["tokenizer.ggml.bos_token_id"] == BOS
    assert metadata["tokenizer.ggml.add_space_prefix"] is False


def test_gguf_errors(tmp_path):
    with pytest.raises(TokenizerError, match="GGUF file not found"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(TokenizerError, match="not a GGUF file"):
        Tokenizer.from_gguf(empty)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(TokenizerError, match="not a GGUF file"):
        Tokenizer.from_gguf(not_gguf)
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(write_gguf(tmp_path / "full.gguf").read_bytes()[:2000])
    with pytest.raises(TokenizerError, match="truncated or corrupt"):
        Tokenizer.from_gguf(truncated)
    with pytest.raises(TokenizerError, match=r"tokenizer.ggml.model is 'gpt2'; only 'llama'"):
        Tokenizer.from_gguf(write_gguf(tmp_path / "bpe.gguf", model="gpt2"))
    with pytest.raises(TypeError):
        Tokenizer.from_gguf(42)


def metadata(**overrides):
    tokens, scores, types = gguf_vocab()
    base = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.array(scores, dtype=np.float32),
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
        "tokenizer.ggml.bos_token_id": BOS,
        "tokenizer.ggml.eos_token_id": EOS,
        "tokenizer.ggml.unknown_token_id": UNK,
        "tokenizer.ggml.padding_token_id": PAD,
        "tokenizer.ggml.add_space_prefix": False,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"tokenizer.ggml.tokens": None}, "no tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.scores": np.zeros(3, np.float32)}, "lengths differ"),
        ({"tokenizer.ggml.bos_token_id": 10**6}, "bos_token_id = 1000000 is outside the vocabulary"),
        ({"tokenizer.ggml.eos_token_id": None}, "no tokenizer.ggml.eos_token_id"),
        ({"tokenizer.ggml.token_type": np.array([9] * len(gguf_vocab()[0]), np.int32)}, r"token_type\[0\] = 9"),
        ({"tokenizer.ggml.tokens": ["a"] * len(gguf_vocab()[0])}, r"tokens\[1\] 'a' is empty or duplicated"),
    ],
)
def test_gguf_metadata_errors(overrides, error):
    with pytest.raises(TokenizerError, match=error):
        model_proto_from_gguf_metadata(metadata(**overrides), where="tiny.gguf")


def test_gguf_proto_settings():
    proto = model_proto_from_gguf_metadata(metadata())
    assert proto.trainer_spec.model_type == sp_pb2.TrainerSpec.BPE
    assert proto.trainer_spec.byte_fallback
    assert proto.normalizer_spec.name == "identity"
    assert not proto.normalizer_spec.add_dummy_prefix
    assert not proto.normalizer_spec.remove_extra_whitespaces
    assert proto.normalizer_spec.escape_whitespaces
    assert proto.pieces[UNK].type == Piece.UNKNOWN  # was CONTROL in the GGUF
    assert proto.pieces[START_OF_TURN].type == Piece.CONTROL  # only the in-memory copy is user-defined
    assert (proto.trainer_spec.bos_piece, proto.trainer_spec.eos_piece) == ("<bos>", "<eos>")
