"""TEMP stand-in."""

import math
from collections import Counter

import numpy as np


def _grams(tokens, n=4):
    c = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            c[tuple(tokens[i : i + k])] += 1
    return c


class CiderD:
    def __init__(self, references, n=4, sigma=6.0):
        self.n, self.sigma = n, sigma
        self.df = Counter()
        for refs in references:
            self.df.update(set(g for r in refs for g in _grams(r, n)))
        self.ref_len = math.log(float(len(references)))
        self.refs = [[self._vec(r) for r in refs] for refs in references]

    def _vec(self, tokens):
        vec = [dict() for _ in range(self.n)]
        norm = [0.0] * self.n
        for g, tf in _grams(tokens, self.n).items():
            k = len(g) - 1
            v = tf * (self.ref_len - math.log(max(1.0, self.df.get(g, 0.0))))
            vec[k][g] = v
            norm[k] += v * v
        return vec, [math.sqrt(x) for x in norm], len(tokens)

    def _sim(self, h, r):
        (vh, nh, lh), (vr, nr, lr) = h, r
        delta = lh - lr
        val = np.zeros(self.n)
        for k in range(self.n):
            for g, x in vh[k].items():
                if g in vr[k]:
                    val[k] += min(x, vr[k][g]) * vr[k][g]
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
            val[k] *= math.e ** (-(delta**2) / (2 * self.sigma**2))
        return val

    def score_against(self, hyps, references):
        out = []
        for h, refs in zip(hyps, references):
            vh = self._vec(h)
            s = sum(self._sim(vh, r if isinstance(r, tuple) else self._vec(r)) for r in refs)
            out.append(float(np.mean(s)) / len(refs) * 10.0)
        return np.array(out)

    def score(self, hyps, images):
        return self.score_against(hyps, [self.refs[i] for i in images])


def cider_d(hyps, references):
    c = CiderD(references)
    s = c.score(hyps, list(range(len(hyps))))
    return float(s.mean()), s
