"""Review fixes (s25) to the structured-output constraints: repetition limits that `{,n}` and nested
repetitions slipped past, a per-canvas host pass that grew with the slot's width, a cache bounded by count
only, characters a tokenizer cannot write whole, logit_bias keys, and the many-choices message."""

from __future__ import annotations

import random
import re
import time

import pytest
import torch

from canvaslm.sampling.choice import ChoiceConstraint
from canvaslm.sampling.constraints import ConstraintError, TokenDFA
from canvaslm.sampling.logit_bias import LogitBiasError, normalize
from canvaslm.sampling.regex import RegexConstraint
from canvaslm.sampling.regex_fsm import MAX_REPEAT, RegexCompileError, char_fsm, char_fsm_with_deadline
from canvaslm.sampling.token_dfa import DFACache, Vocab

# --- 1. repetition limits ----------------------------------------------------------------------------


@pytest.mark.parametrize("pattern,words", [
    ("a{,5000}", r"repetition \{,5000\} is over the limit of 1000"),  # {,n} is {0,n}: was compiled (2.5 s)
    ("(a{100}){60}", r"nested repetitions \{100\}\{60\} unroll into 6000 copies of their atoms, over the limit of "
                     "5000"),
    ("(?:x(a{,50})){,110}", r"nested repetitions \{,50\}\{,110\} unroll into 5610 copies"),  # x and 50 a's, 110 times
    ("a{80}{80}", r"nested repetitions \{80\}\{80\} unroll into 6400 copies"),  # interegular: 6400 a's
    ("((a){2}b{30}){500}", r"nested repetitions \{30\}\{500\} unroll into 16000 copies"),  # (2 + 30) x 500
    ("(a{1000}b{1000}){5}", r"nested repetitions \{1000\}\{5\} unroll into 10000 copies"),  # a group's parts add up
    ("(a{1000}|b{1000}){5}", r"unroll into 10000 copies"),  # alternatives too: interegular builds each
    ("a{,5}{3,1}", r"repetition \{3,1\} has its minimum repeat greater than its maximum"),
], ids=["empty-lower", "nested-group", "nested-empty-lower", "nested-atom", "nested-inner", "sequence-in-group",
        "alternatives-in-group", "min-over-max"])
def test_repetition_limits_cover_empty_lower_bounds_and_nesting(pattern, words):
    t = time.monotonic()
    with pytest.raises(RegexCompileError, match=words):
        char_fsm(pattern)
    assert time.monotonic() - t < 1.0


def test_repetitions_within_the_limits_still_compile():
    assert char_fsm("(a{10}){100}").num_states == MAX_REPEAT + 1
    assert char_fsm("a{,1000}").num_states == MAX_REPEAT + 1
    assert char_fsm("a{2}{3}").num_states == 7  # six a's, as interegular reads it
    char_fsm(r"([a-z]{1,100}\.){1,20}")  # 2020 nested copies: within MAX_NESTED (0.5 s)
    assert char_fsm("(a{1000}b{1000}){2}").num_states == 4001  # 4000 copies


@pytest.mark.parametrize("pattern,text", [("[{5000}]", "{"), ("[^]{5000}]", "x"), (r"\{5000}", "{5000}"),
                                          ("a{}b", "b"), ("a{,}b", "aab")],
                         ids=["class", "negated-class", "escaped", "empty", "comma"])
def test_braces_that_are_characters_are_not_repetitions(pattern, text):
    fsm = char_fsm(pattern)
    s = fsm.initial
    for c in text:
        s = fsm.step(s, fsm.classify(c))
    assert s in fsm.finals


def test_the_server_compile_refuses_an_over_limit_repetition_at_once():
    """It held a compile turn for the whole 10 s deadline, then said 'took longer' instead of naming the limit."""
    t = time.monotonic()
    with pytest.raises(RegexCompileError, match=r"repetition \{,1000000\} is over the limit of 1000"):
        char_fsm_with_deadline("a{,1000000}", 10)
    assert time.monotonic() - t < 1.0


def test_regex_constraint_names_the_repetition_limit(tiny_llm):
    with pytest.raises(ConstraintError, match=r"^regex: cannot compile 'a\{,20000\}': repetition"):
        RegexConstraint("a{,20000}", tiny_llm.tokenizer, 8)


# --- 2. coreach once per constraint ------------------------------------------------------------------


def _old_coreach(dfa: TokenDFA, n: int) -> torch.Tensor:
    """The per-call computation the rows replace: [n + 1, S]."""
    src, _, tgt = dfa.edges
    co = torch.zeros(n + 1, dfa.num_states, dtype=torch.bool)
    co[0] = dfa.accept
    for j in range(1, n + 1):
        co[j].index_fill_(0, src[co[j - 1][tgt]], True)
    return co


def _random_dfa(rng: random.Random) -> TokenDFA:
    S, G, V = rng.randint(1, 14), rng.randint(1, 4), 9
    trans = torch.tensor([[rng.randrange(S) if rng.random() < 0.45 else -1 for _ in range(G)] for _ in range(S)],
                         dtype=torch.long).view(S, G)
    sym = torch.tensor([rng.randrange(-1, G) for _ in range(V)], dtype=torch.long)
    accept = torch.tensor([rng.random() < 0.3 for _ in range(S)])
    return TokenDFA(sym, trans, rng.randrange(S), accept)


def test_coreach_rows_equal_the_old_computation_on_random_automata():
    rng = random.Random(0)
    for _ in range(300):
        dfa = _random_dfa(rng)
        n = rng.randint(0, 90)
        old, rows = _old_coreach(dfa, n), dfa.coreach_rows(n)
        assert rows.rows.shape[0] <= n + 1
        for j in range(n + 1):
            assert torch.equal(rows[j], old[j]), (j, n)
        assert torch.equal(dfa.coreach(n), old)
        with pytest.raises(IndexError):
            rows[n + 1]


def test_masks_and_paths_with_the_rows_equal_the_old_ones_on_random_automata():
    rng = random.Random(1)
    checked = 0
    for _ in range(300):
        dfa = _random_dfa(rng)
        width = rng.randint(1, 40)
        rows, old = dfa.coreach_rows(width), _old_coreach(dfa, width)
        if not bool(old[width, dfa.start]):
            continue
        state, remaining = dfa.start, width
        while remaining > 0:  # walk the slot a few positions at a time, as canvases do
            n = min(remaining, rng.randint(1, 6))
            masks = dfa.token_masks(state, n, remaining, 9, rows)
            assert torch.equal(masks, dfa.token_masks(state, n, remaining, 9, old))
            assert torch.equal(masks, dfa.token_masks(state, n, remaining, 9))
            logp = torch.log_softmax(torch.randn(n, 9, generator=torch.Generator().manual_seed(checked)), -1)
            path, end = dfa.best_path(state, logp, remaining, rows)
            assert (path, end) == dfa.best_path(state, logp, remaining, old)
            state, remaining, checked = end, remaining - n, checked + 1
        assert bool(dfa.accept[state])
    assert checked > 50


def test_a_wide_slot_computes_its_coreach_once_per_request(tiny_llm, monkeypatch):
    """Every canvas's mask and commit recomputed the rows for the rest of the slot: 1.6-1.9 s each at a width
    of 100,000, so a long regex / JSON-mode output cost W^2 / C."""
    V = tiny_llm.model.cfg.vocab_size
    spec = RegexConstraint(r"[a-z]+( [a-z]+)*\.", tiny_llm.tokenizer, 200_000)
    calls = []
    real = TokenDFA.coreach_rows
    monkeypatch.setattr(TokenDFA, "coreach_rows", lambda self, n: calls.append(n) or real(self, n))
    for _ in range(2):  # two requests of the same spec
        c = spec.for_row()
        t = time.monotonic()
        for k in range(4):
            c.canvas(k, 16, V)
            c.commit(k, torch.zeros(16, dtype=torch.long), torch.randn(16, V))
        assert time.monotonic() - t < 2.0  # was ~14 s: 8 passes over 200,000 positions
    assert len(calls) <= 1, calls  # the constructor's own check already made the slot's rows


# --- 3. the automaton cache is bounded by bytes ------------------------------------------------------


def _dfa_of_bytes(S: int, G: int) -> TokenDFA:
    return TokenDFA(torch.full((10,), -1, dtype=torch.long), torch.full((S, G), -1, dtype=torch.long), 0,
                    torch.zeros(S, dtype=torch.bool))


def test_dfa_cache_keeps_at_most_max_bytes():
    big = _dfa_of_bytes(100, 100)  # 80,000 bytes of transitions
    cache = DFACache(size=64, max_bytes=200_000)
    for i in range(5):
        cache.put(i, _dfa_of_bytes(100, 100))
    assert len(cache) == 2 and 0 not in cache and 4 in cache and 3 in cache
    assert cache.bytes <= 200_000
    cache.get(3)  # most recently used now: 4 goes first
    cache.put("x", big)
    assert 3 in cache and 4 not in cache and "x" in cache
    huge = _dfa_of_bytes(1000, 100)
    assert cache.put("huge", huge) is huge and "huge" not in cache  # larger than the budget alone: not kept
    assert len(cache) == 2


def test_dfa_cache_keeps_its_count_cap_and_counts_union_entries():
    cache = DFACache(size=3)
    for i in range(5):
        cache.put(i, _dfa_of_bytes(2, 2))
    assert len(cache) == 3 and 1 not in cache
    a, b, u = _dfa_of_bytes(2, 2), _dfa_of_bytes(2, 2), _dfa_of_bytes(4, 4)
    before = cache.bytes
    cache.put("u", ((a, b), u))  # a union entry: its members' tables count too
    cache.put("u", ((a, b), u))  # replacing an entry does not count it twice
    assert len(cache) == 3
    each = sum(t.nbytes for t in (a.sym_of_token, a.trans, a.accept, *a.edges))
    assert cache.bytes - before + each == 2 * each + sum(t.nbytes for t in (u.sym_of_token, u.trans, u.accept,
                                                                             *u.edges))


def test_a_vocabulary_cache_has_a_byte_budget(tiny_llm):
    assert 0 < Vocab.of(tiny_llm.tokenizer).dfas.max_bytes <= 512 << 20


# --- 4. characters a tokenizer cannot write whole ----------------------------------------------------


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE trained without 日, 本 or ë: it spells them with partial UTF-8 byte tokens."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from canvaslm.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["hello world, no yes maybe the quick brown fox 12 345"] * 20, trainer)
    tok = Tokenizer(backend, bos_id=2, eos_ids=[1], pad_id=0, name="bpe")
    assert tok.decode(tok.encode("日本 ë", add_special_tokens=False)) == "日本 ë"
    assert not {"日", "本", "ë"} & Vocab.of(tok).chars
    return tok


def test_a_regex_needing_an_unwritable_character_names_it(bpe):
    """`日本` said 'no match fits ... raise max_tokens', which no width would cure."""
    with pytest.raises(ConstraintError, match=r"^regex: no token of this tokenizer writes the character\(s\) "
                                              r"'日', '本' .*partial UTF-8 byte tokens"):
        RegexConstraint("日本", bpe, 24)


def test_a_branch_needing_an_unwritable_character_is_refused_not_dropped(bpe):
    """`"ë"|"x"` silently always wrote x."""
    with pytest.raises(ConstraintError, match=r"writes the character\(s\) 'ë'"):
        RegexConstraint("ë|x", bpe, 24)
    from canvaslm.sampling.grammar import GrammarConstraint
    with pytest.raises(ConstraintError, match=r"^guided_grammar: .*'ë'.*so the grammar cannot be written"):
        GrammarConstraint('root ::= "ë" | "x"', bpe, 24)
    c = RegexConstraint("zo[ëe]", bpe, 24)  # a class with a writable character keeps working with it
    assert c.width == 24


def test_a_choice_needing_an_unwritable_character_names_its_field(bpe):
    with pytest.raises(ConstraintError, match=r"^guided_choice\[1\]: no token of this tokenizer writes the "
                                              r"character\(s\) '日', '本'"):
        ChoiceConstraint(["no", "日本"], bpe, "guided_choice")


def test_a_schema_enum_needing_an_unwritable_character_names_its_path(bpe):
    from canvaslm.sampling.json_schema import JsonSchemaConstraint
    schema = {"type": "object", "properties": {"k": {"enum": ["no", "ë"]}}, "required": ["k"]}
    with pytest.raises(ConstraintError, match=r"^json_schema: no token .*'ë'.*\(at .*k"):
        JsonSchemaConstraint(schema, bpe)


class _PieceTokenizer:
    """Greedy longest-piece tokenizer over a fixed list of pieces (piece 0 is the EOS, decoding to nothing)."""

    def __init__(self, pieces):
        self.pieces, self.vocab_size, self.eos_ids = pieces, len(pieces), (0,)

    def encode(self, text, add_special_tokens=False):
        ids = []
        while text:
            i = max((i for i, p in enumerate(self.pieces) if p and text.startswith(p)),
                    key=lambda i: len(self.pieces[i]))
            ids.append(i)
            text = text[len(self.pieces[i]):]
        return ids

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_a_pattern_no_token_sequence_spells_says_so_not_raise_max_tokens():
    """'y' is written only inside the token 'xy': no width would help, so 'raise max_tokens' misled."""
    tok = _PieceTokenizer(["", "a", "b", "xy", " "])
    with pytest.raises(ConstraintError, match="no sequence of this tokenizer's tokens spells a match of 'y', at "
                                              "any length") as e:
        RegexConstraint("y", tok, 8)
    assert "raise max_tokens" not in str(e.value)
    with pytest.raises(ConstraintError, match="raise max_tokens"):  # a match exists, only longer than the slot
        RegexConstraint("a{9}", tok, 8)
    with pytest.raises(ConstraintError, match=r"writes the character\(s\) 'é'"):  # in no token at all
        RegexConstraint("é|a", tok, 8)


# --- 5. logit_bias keys ------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["5_0", "٥", " 7 ", "+5", "5.0", "", "-"])
def test_logit_bias_keys_are_ascii_digits(key):
    with pytest.raises(LogitBiasError, match=re.escape(f"logit_bias: key {key!r} is not a token id")):
        normalize({key: 1.0}, vocab=100)


@pytest.mark.parametrize("bias,keys", [({"5": 1, "05": 2}, "'5' and '05'"), ({5: 1, "5": 2}, "5 and '5'"),
                                       ([("7", 1), ("007", 2)], "'7' and '007'")])
def test_logit_bias_keys_naming_one_id_twice_are_refused(bias, keys):
    with pytest.raises(LogitBiasError, match=f"keys {keys} both name token id"):
        normalize(bias, vocab=100)


def test_logit_bias_plain_keys_still_work():
    assert normalize({"50": 1, 7: -2.5, "0": 100}, vocab=100) == ((0, 100.0), (7, -2.5), (50, 1.0))


# --- 6. many long choices ----------------------------------------------------------------------------


def test_too_many_long_choices_name_the_field_and_the_cure(tiny_llm):
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    choices = ["".join(rng.choice(letters) for _ in range(200)) for _ in range(256)]
    with pytest.raises(ConstraintError, match=r"^guided_choice: choices' automaton exceeds 20000 states; use "
                                              "fewer or shorter choices"):
        ChoiceConstraint(choices, tiny_llm.tokenizer, "guided_choice")
