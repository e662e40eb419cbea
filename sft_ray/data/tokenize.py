"""Pure tokenization with token-exact labels that match inference.

An example's text is tokenized whole, as inference tokenizes a prompt, and the labels follow the
character spans the format marked as trained. Tokenizing pieces on their own would not give the
model's ids: SentencePiece/Metaspace tokenizers put a `▁` in front of every piece, and byte-level
BPE merges across piece ends. The rules, for every tokenizer family:

- The ids before each trained span are exactly the ids of the prompt tokenized alone (with the
  tokenizer's BOS for the plain formats; as `apply_chat_template(..., add_generation_prompt=True,
  tokenize=True)` gives them for chat). Where the whole text's tokenization has a token boundary at
  the span start, that is the same thing (a BPE merge never crosses a token boundary it did not
  make). Where a merge crosses it (a prompt ending in `Answer: 1` before a completion `23`), the
  inference prompt wins: the prompt is tokenized alone and the rest as its continuation.
- Control tokens spelled inside data (`</s>` in a user's question) are tokenized as text, as
  `apply_chat_template(..., sanitize_control_tokens=True)` does: the formats mark them
  (formats.mark_control_text), and marked pieces are encoded without special tokens. The plain
  formats have no control tokens of their own, so their whole text is encoded that way.

Truncation rule: an example longer than `max_length` keeps its first `max_length` tokens (the
start of the prompt is kept, the end of the response is cut, EOS included). An example left with
no trained token is dropped with reason `no_trained_tokens_after_truncation`.
"""

from __future__ import annotations

import itertools
import operator
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from sft_ray.data.formats import MARK_END, MARK_START, BadRow, Example

IGNORE = -100


@dataclass(frozen=True)
class Special:
    """Token ids the encoder adds itself, read once from the tokenizer."""

    prefix: tuple[int, ...]  # what the tokenizer puts in front of a text (BOS), possibly empty
    eos: int


_ADDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _added(tokenizer) -> tuple[str, ...]:
    """The tokenizer's added tokens (transformers rebuilds that mapping on every access)."""
    if tokenizer not in _ADDED:
        _ADDED[tokenizer] = tuple(tokenizer.added_tokens_encoder)
    return _ADDED[tokenizer]


def _run_may_split(tokenizer, text: str, after: str) -> bool:
    """Whether the run of whitespace ending the prompt `text` is pre-tokenized differently alone
    than with `after` following it.

    Byte-level split patterns decide whitespace runs by what follows: GPT-2's `\s+(?!\S)` takes a
    run whole at the end of a text but leaves its last space to a word after it (`a  ` is `a` `  `
    alone, `a` ` ` ` b` before `b`), where Llama-3's and Qwen's `\s*[\r\n]+` keep newline runs
    whole either way. Within equal pre-tokens, BPE gives equal ids left of a clean token boundary,
    so only these runs need the prompt tokenized alone. Compared on the run with its neighbours.
    """
    run = text[len(text.rstrip()) :]
    pre = getattr(_backend(tokenizer), "pre_tokenizer", None)
    if len(run) < 2 or pre is None:  # one whitespace character splits the same either way
        return False
    before = text[: -len(run)]
    # The run with the character before it, as the split pattern sees it; after an added token the
    # run starts a piece of its own (added tokens are split off first).
    window = run if any(before.endswith(t) for t in _added(tokenizer)) else text[-len(run) - 1 :]
    alone = [span for _, span in pre.pre_tokenize_str(window)]
    joint = [(a, min(b, len(window))) for _, (a, b) in pre.pre_tokenize_str(window + after[:2]) if a < len(window)]
    return alone != joint


def special_ids(tokenizer) -> Special:
    """What the post-processor puts in front of a text (BOS); one that also appends EOS to every
    text (`<s> $A </s>`) would otherwise put an EOS in front of every example."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    at = next((i for i in range(len(with_special)) if with_special[i : i + len(bare)] == bare), 0)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set one so responses can be terminated")
    return Special(prefix=tuple(with_special[:at]), eos=tokenizer.eos_token_id)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


@lru_cache(maxsize=16)
def _encodes_as_rust(cls: type) -> bool:
    """Whether a tokenizer class encodes text exactly as its Rust tokenizer does (asked once per class:
    this runs for every example)."""
    from transformers import PreTrainedTokenizerBase, TokenizersBackend

    return (
        issubclass(cls, TokenizersBackend)
        and cls.__call__ is PreTrainedTokenizerBase.__call__
        and cls._encode_plus is TokenizersBackend._encode_plus
        and not hasattr(cls, "_switch_to_input_mode")
    )


def _backend(tokenizer):
    """The Rust tokenizer behind `tokenizer`, or None where the class changes how text is encoded."""
    if _encodes_as_rust(type(tokenizer)):
        backend = tokenizer.backend_tokenizer
        # What a tokenizer call sets before encoding: no truncation, no padding.
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        return backend
    return None


_START, _END = operator.itemgetter(0), operator.itemgetter(1)


class Offsets(Sequence):
    """The character offsets of a Rust encoding's tokens from token `base` on, read from Rust where
    asked: a cut needs the tokens next to it, not a Python tuple for every token (turning all
    offsets into tuples took a fifth of the tokenizer's own time, measured)."""

    __slots__ = ("enc", "base")

    def __init__(self, enc, base: int = 0):
        self.enc, self.base = enc, base

    def __len__(self) -> int:
        return len(self.enc) - self.base

    def __getitem__(self, i):
        if isinstance(i, slice) and i.step is None and i.stop is None and (i.start or 0) >= 0:
            return Offsets(self.enc, min(len(self.enc), self.base + (i.start or 0)))  # what the cuts take
        return self.enc.offsets[self.base :][i]

    def __iter__(self):
        return iter(self.enc.offsets[self.base :])

    def split(self, at: int) -> int | None | bool:
        """`_split` read from Rust around character `at`; False where only the full scan can tell
        (no token holds `at`, or another token starts there too, as a character's byte tokens do)."""
        # Starts run in text order (one text, no special tokens added); `t` is the first token that
        # holds `at`, so no token before it ends past `at` unless it also starts at or after `at`.
        t = self.enc.char_to_token(at)
        if t is None or t <= self.base or self.enc.token_to_chars(t - 1)[0] >= at:
            return False
        return None if self.enc.token_to_chars(t)[0] < at else t - self.base


Tokens = tuple[list[int], "list[tuple[int, int]] | Offsets | None"]  # ids, character offsets (None: not known)


def encode_texts(tokenizer, texts: list[str], as_text: bool) -> list[Tokens]:
    """Ids (and offsets, from a Rust tokenizer) of whole texts, no BOS; `as_text`: special tokens
    spelled in the text are text. One batched call: tokenization is most of the encoder's time."""
    if not texts:
        return []
    backend = _backend(tokenizer)
    if backend is None:
        ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]
        return [(x, None) for x in ids]
    before = backend.encode_special_tokens
    backend.encode_special_tokens = as_text
    try:
        return [(e.ids, Offsets(e)) for e in backend.encode_batch(texts, add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = before


def _after_newline(tokenizer, text: str, start: int, as_text: bool) -> Tokens:
    """Ids of `text` where it continues a longer text, its offsets shifted by `start`.

    Tokenized after a newline, which is then removed: SentencePiece adds its prefix space only at
    the start of a text (transformers' `encode_marked_chat` does the same).
    """
    nl, (ids, offs) = encode_texts(tokenizer, ["\n", "\n" + text], as_text)
    nl = nl[0]
    shift = start - 1
    if ids[: len(nl)] != nl:
        [(ids, offs)] = encode_texts(tokenizer, [text], as_text)
        shift, nl = start, []
    offs = [(a + shift, b + shift) for a, b in offs[len(nl) :]] if offs is not None else None
    return ids[len(nl) :], offs


@lru_cache(maxsize=8)
def _markers(added: tuple[str, ...]) -> re.Pattern:
    tokens = "|".join(map(re.escape, sorted(added, key=len, reverse=True))) or "(?!)"
    return re.compile(f"{MARK_START}({tokens}){MARK_END}|[{MARK_START}{MARK_END}]")


def encode_marked(tokenizer, text: str, start: int = 0) -> Tokens:
    """A chat text with marked control-token spellings: marked tokens as text, markers dropped, the
    rest (the template's own control tokens included) as usual; as `encode_marked_chat` does.
    `start` > 0: the text continues a longer one from that character (offsets shifted by it)."""
    pieces: list[tuple[int, int, bool]] = []  # (start, end, as_text)
    pos = 0
    for m in _markers(_added(tokenizer)).finditer(text):
        pieces.append((pos, m.start(), False))
        if m.group(1) is not None:
            pieces.append((m.start(1), m.end(1), True))
        pos = m.end()
    pieces.append((pos, len(text), False))
    ids, offs = [], []
    for k, (a, b, as_text) in enumerate(pieces):
        if a == b:
            continue
        if k == 0 and start == 0:
            p_ids, p_offs = encode_texts(tokenizer, [text[a:b]], as_text)[0]
        else:
            p_ids, p_offs = _after_newline(tokenizer, text[a:b], start + a, as_text)
        if as_text and tokenizer.convert_tokens_to_ids(text[a:b]) in p_ids:
            raise BadRow(
                "control_token_text", f"cannot encode {text[a:b]!r} as text: the tokenizer reads it as a token"
            )
        ids += p_ids
        offs = offs + list(p_offs) if offs is not None and p_offs is not None else None
    return ids, offs


def _split(offsets: list[tuple[int, int]] | None, at: int) -> int | None:
    """How many tokens lie before character `at`, or None when a token straddles it."""
    if offsets is None:
        return None
    if isinstance(offsets, Offsets):
        if (fast := offsets.split(at)) is not False:
            return fast
        offsets = list(offsets)
    # C-level scans (map/compress): this runs for every cut of every example.
    j = next(itertools.compress(itertools.count(), map(at.__le__, map(_START, offsets))), len(offsets))
    if max(map(_END, itertools.islice(offsets, j)), default=at) > at:
        return None
    if min(map(_START, itertools.islice(offsets, j, None)), default=at) < at:
        return None
    return j


def _encode_from(tokenizer, ex: Example, text: str, start: int) -> Tokens:
    """`text`, which starts at character `start` of `ex`, tokenized as `ex`'s whole text is: chat
    with its marked control-token text, the plain formats with all special tokens as text."""
    if ex.templated:
        return encode_marked(tokenizer, text, start)
    return _after_newline(tokenizer, text, start, True) if start else encode_texts(tokenizer, [text], True)[0]


def _labelled(tokenizer, ex: Example, tokens: Tokens) -> tuple[list[int], list[int]]:
    """The example's ids and labels (the id where trained, IGNORE elsewhere); cut where its spans start and end.

    `tokens` are the whole text's; they are cut where a token boundary marks a cut. A prompt's end
    (a span start) is checked against the prompt tokenized alone wherever that could differ: a
    token straddles the cut, an earlier cut already re-tokenized the rest, or the prompt ends in
    a run of whitespace this tokenizer may split differently alone (_run_may_split). Where they
    differ, the prompt's ids win and the rest is tokenized as its continuation.
    """

    def alone(text: str, start: int = 0) -> list[int]:
        return _encode_from(tokenizer, ex, text, start)[0]

    def rest(cut: int) -> Tokens:
        return _encode_from(tokenizer, ex, ex.text[cut:], cut)

    starts = {a for a, _ in ex.spans}
    ids, labels = [], []
    cur_ids, cur_offs = tokens
    whole = True  # cur_ids are the whole text's own tokens (no cut re-tokenized the rest yet)
    pos = 0
    for cut in sorted({c for span in ex.spans for c in span if 0 < c < len(ex.text)}):
        j = _split(cur_offs, cut)
        prompt_end = cut in starts
        if j is None and cur_offs is not None and not prompt_end:
            # A span ends inside a token (Phi-3's `<|end|>` takes in the newline after it): the
            # token belongs to the span, and the whole text's tokens go on unchanged.
            j = sum(1 for a, _ in cur_offs if a < cut)
        if j is not None and not (
            prompt_end and (not whole or _run_may_split(tokenizer, ex.text[:cut], ex.text[cut:]))
        ):
            seg, cur_ids, cur_offs = cur_ids[:j], cur_ids[j:], cur_offs[j:]
        else:
            if prompt_end:  # what inference tokenizes: the text before the cut, alone
                head = alone(ex.text[:cut])
                if head[: len(ids)] != ids:
                    raise BadRow(
                        "boundary_merge",
                        f"the prompt before character {cut} tokenizes differently alone than inside the text "
                        "(a BPE merge crosses an earlier turn's end)",
                    )
                seg = head[len(ids) :]
            else:  # the end of a trained span: the span's text as a continuation
                seg = alone(ex.text[pos:cut], pos)
            if cur_ids[: len(seg)] == seg:
                # The whole text's ids go on the same way (also where a token took in text after the
                # cut: Phi-3's `<|assistant|>` strips the whitespace after it).
                cur_ids = cur_ids[len(seg) :]
                cur_offs = cur_offs[len(seg) :] if cur_offs is not None else None
            else:  # a merge crosses the cut: the rest continues what came before it
                cur_ids, cur_offs = rest(cut)
                whole = False
        inside = any(a <= pos < b for a, b in ex.spans)
        ids += seg
        labels += seg if inside else [IGNORE] * len(seg)
        pos = cut
    inside = any(a <= pos < b for a, b in ex.spans)
    return ids + cur_ids, labels + (cur_ids if inside else [IGNORE] * len(cur_ids))


def _turns_apart(ex: Example) -> list[Example]:
    """One example per trained span, each ending after its span (and the whitespace after it)."""
    out = []
    for a, b in ex.spans:
        end = b
        while end < len(ex.text) and ex.text[end].isspace():
            end += 1
        out.append(ex._replace(text=ex.text[:end], spans=[(a, b)]))
    return out


def _encode_one(tokenizer, ex: Example, tokens: Tokens | None, special: Special, max_length: int) -> Encoded | str:
    ids, labels = _labelled(tokenizer, ex, tokens or _encode_from(tokenizer, ex, ex.text, 0))
    if not ex.templated:
        ids = [*special.prefix, *ids, special.eos]
        labels = [IGNORE] * len(special.prefix) + labels + [special.eos]
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if labels.count(IGNORE) == len(labels):
        return "no_trained_tokens_after_truncation"
    return Encoded(ids, labels, truncated)


def encode_batch(
    tokenizer, examples: list[Example], special: Special, max_length: int
) -> list[Encoded | list[Encoded] | str | BadRow]:
    """Encode examples; an entry is an `Encoded`, or why it was dropped (a reason string or BadRow).

    A chat example whose later turn's prompt tokenizes differently because of a merge across an
    earlier prompt's end (rare) becomes a list: one example per turn, each with its exact prompt.
    """
    plain = [i for i, ex in enumerate(examples) if not ex.templated]
    chat = [i for i, ex in enumerate(examples) if ex.templated and not ex.control_text]
    tokens: dict[int, Tokens] = {}
    tokens.update(zip(plain, encode_texts(tokenizer, [examples[i].text for i in plain], True)))
    tokens.update(zip(chat, encode_texts(tokenizer, [examples[i].text for i in chat], False)))
    out: list[Encoded | list[Encoded] | str | BadRow] = []
    for i, ex in enumerate(examples):
        try:
            out.append(_encode_one(tokenizer, ex, tokens.get(i), special, max_length))
        except BadRow as err:
            if err.reason != "boundary_merge" or len(ex.spans) < 2:
                out.append(err)
                continue
            try:
                parts = [_encode_one(tokenizer, part, None, special, max_length) for part in _turns_apart(ex)]
            except BadRow as again:
                out.append(again)
                continue
            kept = [p for p in parts if isinstance(p, Encoded)]
            out.append(kept or parts[0])
    return out
