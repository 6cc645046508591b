"""What a JSON-mode slot costs per canvas on a large vocabulary: the canvas mask and the commit (Viterbi)
of `JsonObjectConstraint`, whose passes walk only the automaton's live transitions, against the peer,
the same passes over the dense [states x symbols] table (how they ran before), measured in the same
run on the same automaton, logits and canvas. Masks and committed ids must be equal.

    python bench/constraint_passes.py [--vocab 65536] [--width 255] [--repeat 3]

The vocabulary is a byte-level BPE trained here on the Python sources of the installed packages (no
download; ~20 s for 65k tokens), standing in for a production tokenizer.
"""

from __future__ import annotations

import argparse
import glob
import statistics
import sys
import time

import torch

from canvaslm.sampling.constraints import _NEG, TokenDFA
from canvaslm.sampling.json_any import JsonObjectConstraint
from canvaslm.sampling.token_dfa import Vocab
from canvaslm.tokenizer import Tokenizer


def bpe(vocab: int, files: int) -> Tokenizer:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    site = [p for p in sys.path if p.endswith("site-packages")][:1]
    paths = sorted(glob.glob(f"{site[0]}/**/*.py", recursive=True))[:files] if site else []
    if not paths:
        raise SystemExit("no Python sources found to train the BPE on")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train(paths, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<eos>", "<bos>"],
                                             show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(backend, bos_id=2, eos_ids=[1], pad_id=0, name="bpe")


class DenseDFA(TokenDFA):
    """The peer: every pass over the whole [S, G] table, live transition or not."""

    def coreach(self, n):
        ok, safe = self.trans >= 0, self.trans.clamp(min=0)
        co = torch.zeros(n + 1, self.num_states, dtype=torch.bool)
        co[0] = self.accept
        for j in range(1, n + 1):
            co[j] = (ok & co[j - 1][safe]).any(dim=1)
        return co

    def symbol_masks(self, state, n, remaining, co=None):  # `co` ignored: the peer builds its own table
        co, ok, safe = self.coreach(remaining), self.trans >= 0, self.trans.clamp(min=0)
        fw = torch.zeros(self.num_states, dtype=torch.bool)
        fw[state] = True
        out = torch.zeros(n, self.trans.shape[1], dtype=torch.bool)
        for i in range(n):
            good = ok & co[remaining - i - 1][safe] & fw[:, None]
            out[i] = good.any(dim=0)
            fw = torch.zeros_like(fw).index_fill_(0, safe[good], True)
        return out

    def best_path(self, state, logp, remaining, co=None):
        (n, V), (S, G) = logp.shape, self.trans.shape
        co = self.coreach(remaining)
        t = torch.cat([self.sym_of_token, self.sym_of_token.new_full((max(0, V - self.sym_of_token.numel()),), -1)])[:V]
        logp = logp.float().clamp(min=_NEG)
        best = torch.full((n, G + 1), 2 * _NEG).scatter_reduce(1, torch.where(t >= 0, t, G)[None].expand(n, V), logp,
                                                               "amax")[:, :G].double()
        score = torch.full((S,), 4 * _NEG * (n + 1), dtype=torch.float64)
        score[state] = 0.0
        reach = torch.zeros(S, dtype=torch.bool)
        reach[state] = True
        back = []
        for i in range(n):
            v = ((self.trans >= 0) & reach[:, None] & co[remaining - i - 1][self.trans.clamp(min=0)]).flatten()
            tgt, val = self.trans.flatten()[v], (score[:, None] + best[i][None, :]).flatten()[v]
            idx = torch.arange(S * G)[v]
            score = torch.full((S,), 8 * _NEG * (n + 1), dtype=torch.float64).scatter_reduce(0, tgt, val, "amax")
            win = val >= score[tgt]
            back.append(torch.full((S,), S * G).scatter_reduce(0, tgt[win], idx[win], "amin"))
            reach = torch.zeros(S, dtype=torch.bool).index_fill_(0, tgt, True)
        s = int(torch.where(reach & co[remaining - n], score, torch.full_like(score, float("-inf"))).argmax())
        end, syms = s, []
        for bp in reversed(back):
            s, g = divmod(int(bp[s]), G)
            syms.append(g)
        chosen = torch.tensor(syms[::-1])
        return logp.masked_fill(t[None, :] != chosen[:, None], float("-inf")).argmax(dim=-1).tolist(), end


def timed(constraint, C, V, logits, repeat):
    masks, commits, out = [], [], None
    for _ in range(repeat):
        c = constraint.for_row()
        t = time.perf_counter()
        _, allowed = c.canvas(0, C, V)
        masks.append(time.perf_counter() - t)
        ids = logits.masked_fill(~allowed, -1e9).argmax(-1)
        t = time.perf_counter()
        out = c.commit(0, ids, logits)
        commits.append(time.perf_counter() - t)
    return statistics.median(masks), statistics.median(commits), allowed, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--files", type=int, default=4000, help="Python files the BPE is trained on")
    ap.add_argument("--width", type=int, default=255, help="slot tokens (one 256-token canvas with the EOS)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    t = time.perf_counter()
    tok = bpe(args.vocab, args.files)
    trained = time.perf_counter() - t
    V, C = tok.vocab_size, args.width + 1
    t = time.perf_counter()
    Vocab.of(tok)
    sparse = JsonObjectConstraint(tok, args.width)
    built = time.perf_counter() - t
    d = sparse.dfa
    dense = JsonObjectConstraint(tok, args.width)
    dense.dfa = DenseDFA(d.sym_of_token, d.trans, d.start, d.accept)
    logits = torch.randn(C, V, generator=torch.Generator().manual_seed(0))
    print(f"vocabulary {V} (byte-level BPE, trained in {trained:.1f} s), automaton {d.num_states} states x "
          f"{d.trans.shape[1]} symbols, {d.edges[0].numel()} live transitions (built in {built:.2f} s with the "
          f"vocabulary's text table); slot {args.width} tokens; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    m_s, c_s, a_s, o_s = timed(sparse, C, V, logits, args.repeat)
    m_d, c_d, a_d, o_d = timed(dense, C, V, logits, args.repeat)
    print("| passes | canvas mask (s) | commit (s) |")
    print("|---|---|---|")
    print(f"| dense [states x symbols] (peer) | {m_d:.3f} | {c_d:.3f} |")
    print(f"| live transitions | {m_s:.3f} | {c_s:.3f} |")
    print(f"mask {m_d / m_s:.2f}x, commit {c_d / c_s:.2f}x faster; same masks: {torch.equal(a_s, a_d)}, "
          f"same committed ids: {torch.equal(o_s, o_d)}")


if __name__ == "__main__":
    main()
