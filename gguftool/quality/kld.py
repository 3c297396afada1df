"""KL-divergence of a model against a base model's logits file: llama-perplexity's ``--kl-divergence`` statistics.

Mirrors tools/perplexity/perplexity.cpp: per scored token ``log_softmax(n_vocab, logits, base_log_prob, tok, kld)``
(the float32/double mix of the C code: nll and nll_base are float32, their products are float32 before they are
summed in double, the KLD sum over the vocabulary is double over float32 terms, only base log-probs above -16
count), then ``kl_divergence()``'s summary: ``mean_and_uncertainty``, ``covariance`` and the float ``percentile``
interpolation over the sorted per-token KLD and Δp values.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .logits_file import decode_log_probs

__all__ = ["KLDAccumulator", "KLDStats", "format_kld_stats"]

KLD_PERCENTILES = (("99.9%", 0.999), ("99.0%", 0.990), ("95.0%", 0.950), ("90.0%", 0.900))
KLD_LOW_PERCENTILES = (("10.0%", 0.100), (" 5.0%", 0.050), (" 1.0%", 0.010), (" 0.1%", 0.001))
DP_PERCENTILES = (("99.9%", 0.999), ("99.0%", 0.990), ("95.0%", 0.950), ("90.0%", 0.900), ("75.0%", 0.750))
DP_LOW_PERCENTILES = (("25.0%", 0.250), ("10.0%", 0.100), (" 5.0%", 0.050), (" 1.0%", 0.010), (" 0.1%", 0.001))


def _mean_and_uncertainty(s: float, s2: float, count: int) -> tuple[float, float]:
    if count < 1:
        return 0.0, 0.0
    f = s / count
    df = s2 / count - f * f
    return f, (math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0)


def _covariance(sa: float, sb: float, sab: float, count: int) -> float:
    if count < 10:
        return 0.0
    return (sab / count - (sa / count) * (sb / count)) / (count - 1)


def _percentile(values: np.ndarray, fraction: float) -> float:
    """perplexity.cpp's ``percentile`` lambda: linear interpolation, float arithmetic."""
    f = np.float32(fraction)
    if f <= 0:
        return float(values[0])
    if f >= 1:
        return float(values[-1])
    p = f * np.float32(values.size - 1)
    ip = int(p)
    p = np.float32(p - np.float32(ip))
    hi = values[min(ip + 1, values.size - 1)]
    return float((np.float32(1) - p) * values[ip] + p * hi)


def _median(values: np.ndarray) -> float:
    n = values.size
    if n % 2 == 0:
        return float(np.float32(0.5) * (values[n // 2] + values[n // 2 - 1]))
    return float(values[n // 2])


@dataclass
class KLDStats:
    """What llama-perplexity prints after ``--kl-divergence`` (fractions, not percents, except in the text)."""
    count: int
    ppl: float
    ppl_err: float
    ppl_base: float
    ppl_base_err: float
    ln_ppl_ratio: float
    ln_ppl_ratio_err: float
    ppl_ratio: float
    ppl_ratio_err: float
    ppl_diff: float
    ppl_diff_err: float
    ln_ppl_correlation: float
    kld: float
    kld_err: float
    kld_max: float
    kld_min: float
    kld_median: float
    kld_percentiles: dict[str, float] = field(default_factory=dict)
    dp_mean: float = 0.0
    dp_mean_err: float = 0.0
    dp_max: float = 0.0
    dp_min: float = 0.0
    dp_median: float = 0.0
    dp_percentiles: dict[str, float] = field(default_factory=dict)
    dp_rms: float = 0.0
    dp_rms_err: float = 0.0
    same_top_p: float = 0.0
    same_top_p_err: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class KLDAccumulator:
    """Sums over scored tokens (perplexity.cpp's ``kl_divergence_result``) and the per-token KLD and Δp values."""

    def __init__(self, n_vocab: int):
        self.n_vocab = n_vocab
        self.sum_nll = self.sum_nll2 = self.sum_nll_base = self.sum_nll_base2 = self.sum_nll_nll_base = 0.0
        self.sum_kld = self.sum_kld2 = self.sum_p_diff = self.sum_p_diff2 = self.sum_p_diff4 = 0.0
        self.max_p_diff = 0.0
        self.n_same_top = 0
        self.count = 0
        self._kld: list[np.ndarray] = []
        self._p_diff: list[np.ndarray] = []

    def add(self, logits: np.ndarray, base_rows: np.ndarray, targets: np.ndarray) -> None:
        """One chunk: logits (n, n_vocab) of the model, the base file's rows (n, nv), the tokens predicted (n,)."""
        f32 = np.float32
        logits = np.asarray(logits, dtype=f32)
        n = logits.shape[0]
        idx = np.arange(n)
        imax = logits.argmax(axis=1)                       # first maximum, as the strict '>' scan
        mx = logits[idx, imax]
        lse = np.log(np.exp(logits - mx[:, None]).sum(axis=1, dtype=np.float64)).astype(f32)
        nll = (mx + lse) - logits[idx, targets]
        base = decode_log_probs(base_rows, self.n_vocab)
        nll_base = -base[idx, targets]
        self.sum_nll += float(nll.astype(np.float64).sum())
        self.sum_nll2 += float((nll * nll).astype(np.float64).sum())
        self.sum_nll_base += float(nll_base.astype(np.float64).sum())
        self.sum_nll_base2 += float((nll_base * nll_base).astype(np.float64).sum())
        self.sum_nll_nll_base += float((nll * nll_base).astype(np.float64).sum())
        shift = mx + lse                                   # max_logit += log_sum_exp
        terms = np.exp(base) * ((base - logits) + shift[:, None])
        kld = np.where(base > f32(-16), terms, f32(0)).sum(axis=1, dtype=np.float64)
        self.sum_kld += float(kld.sum())
        self.sum_kld2 += float((kld * kld).sum())
        self.count += n
        self.n_same_top += int((imax == base.argmax(axis=1)).sum())
        p_diff = np.exp(-nll) - np.exp(-nll_base)
        p_diff2 = (p_diff * p_diff).astype(np.float64)
        self.sum_p_diff += float(p_diff.astype(np.float64).sum())
        self.sum_p_diff2 += float(p_diff2.sum())
        self.sum_p_diff4 += float((p_diff2 * p_diff2).sum())
        self.max_p_diff = max(self.max_p_diff, float(np.abs(p_diff).max(initial=0)))
        self._kld.append(kld.astype(f32))
        self._p_diff.append(p_diff.astype(f32))

    def running(self) -> tuple[float, float]:
        """(PPL(Q), mean KLD) so far, for a progress display."""
        m, _ = _mean_and_uncertainty(self.sum_nll, self.sum_nll2, self.count)
        k, _ = _mean_and_uncertainty(self.sum_kld, self.sum_kld2, self.count)
        return math.exp(m) if m < 709 else math.inf, k

    def stats(self) -> KLDStats:
        """kl_divergence()'s summary over everything added."""
        count = self.count
        ln_q, ln_q_err = _mean_and_uncertainty(self.sum_nll, self.sum_nll2, count)
        ln_b, ln_b_err = _mean_and_uncertainty(self.sum_nll_base, self.sum_nll_base2, count)
        ppl, ppl_b = math.exp(ln_q), math.exp(ln_b)
        ppl_err, ppl_b_err = ppl * ln_q_err, ppl_b * ln_b_err
        cov = _covariance(self.sum_nll, self.sum_nll_base, self.sum_nll_nll_base, count)
        den = ln_q_err * ln_b_err
        cor = cov / den if den else float("nan")
        ratio_ln = ln_q - ln_b
        ratio_ln_err = math.sqrt(max(ln_q_err * ln_q_err + ln_b_err * ln_b_err - 2.0 * cov, 0.0))
        ratio = math.exp(ratio_ln)
        ppl_cov = ppl * ppl_b * cov
        diff_err = math.sqrt(max(ppl_err * ppl_err + ppl_b_err * ppl_b_err - 2.0 * ppl_cov, 0.0))
        kld_m, kld_e = _mean_and_uncertainty(self.sum_kld, self.sum_kld2, count)
        klds = np.sort(np.concatenate(self._kld)) if self._kld else np.zeros(1, np.float32)
        dps = np.sort(np.concatenate(self._p_diff)) if self._p_diff else np.zeros(1, np.float32)
        dp_m, dp_e = _mean_and_uncertainty(self.sum_p_diff, self.sum_p_diff2, count)
        mse, mse_e = _mean_and_uncertainty(self.sum_p_diff2, self.sum_p_diff4, count)
        rms = math.sqrt(mse)
        top = self.n_same_top / count if count else 0.0
        return KLDStats(
            count=count, ppl=ppl, ppl_err=ppl_err, ppl_base=ppl_b, ppl_base_err=ppl_b_err,
            ln_ppl_ratio=ratio_ln, ln_ppl_ratio_err=ratio_ln_err, ppl_ratio=ratio, ppl_ratio_err=ratio * ratio_ln_err,
            ppl_diff=ppl - ppl_b, ppl_diff_err=diff_err, ln_ppl_correlation=cor,
            kld=kld_m, kld_err=kld_e, kld_max=float(klds[-1]), kld_min=float(klds[0]), kld_median=_median(klds),
            kld_percentiles={k.strip(): _percentile(klds, f) for k, f in KLD_PERCENTILES + KLD_LOW_PERCENTILES},
            dp_mean=dp_m, dp_mean_err=dp_e, dp_max=float(dps[-1]), dp_min=float(dps[0]), dp_median=_median(dps),
            dp_percentiles={k.strip(): _percentile(dps, f) for k, f in DP_PERCENTILES + DP_LOW_PERCENTILES},
            dp_rms=rms, dp_rms_err=(0.5 / rms * mse_e if rms > 0 else 0.0),
            same_top_p=top, same_top_p_err=(math.sqrt(top * (1 - top) / (count - 1)) if count > 1 else 0.0))


def format_kld_stats(s: KLDStats) -> str:
    """The three blocks llama-perplexity prints at the end of ``--kl-divergence``, in its layout."""
    out = ["====== Perplexity statistics ======",
           f"Mean PPL(Q)                   : {s.ppl:10.6f} ± {s.ppl_err:10.6f}",
           f"Mean PPL(base)                : {s.ppl_base:10.6f} ± {s.ppl_base_err:10.6f}",
           f"Cor(ln(PPL(Q)), ln(PPL(base))): {100.0 * s.ln_ppl_correlation:6.2f}%",
           f"Mean ln(PPL(Q)/PPL(base))     : {s.ln_ppl_ratio:10.6f} ± {s.ln_ppl_ratio_err:10.6f}",
           f"Mean PPL(Q)/PPL(base)         : {s.ppl_ratio:10.6f} ± {s.ppl_ratio_err:10.6f}",
           f"Mean PPL(Q)-PPL(base)         : {s.ppl_diff:10.6f} ± {s.ppl_diff_err:10.6f}",
           "",
           "====== KL divergence statistics ======",
           f"Mean    KLD: {s.kld:10.6f} ± {s.kld_err:10.6f}",
           f"Maximum KLD: {s.kld_max:10.6f}"]
    out += [f"{k}   KLD: {s.kld_percentiles[k.strip()]:10.6f}" for k, _ in KLD_PERCENTILES]
    out.append(f"Median  KLD: {s.kld_median:10.6f}")
    out += [f"{k}   KLD: {s.kld_percentiles[k.strip()]:10.6f}" for k, _ in KLD_LOW_PERCENTILES]
    out += [f"Minimum KLD: {s.kld_min:10.6f}",
            "",
            "====== Token probability statistics ======",
            f"Mean    Δp: {100.0 * s.dp_mean:6.3f} ± {100.0 * s.dp_mean_err:5.3f} %",
            f"Maximum Δp: {100.0 * s.dp_max:6.3f}%"]
    out += [f"{k}   Δp: {100.0 * s.dp_percentiles[k.strip()]:6.3f}%" for k, _ in DP_PERCENTILES]
    out.append(f"Median  Δp: {100.0 * s.dp_median:6.3f}%")
    out += [f"{k}   Δp: {100.0 * s.dp_percentiles[k.strip()]:6.3f}%" for k, _ in DP_LOW_PERCENTILES]
    out += [f"Minimum Δp: {100.0 * s.dp_min:6.3f}%",
            f"RMS Δp    : {100.0 * s.dp_rms:6.3f} ± {100.0 * s.dp_rms_err:5.3f} %",
            f"Same top p: {100.0 * s.same_top_p:6.3f} ± {100.0 * s.same_top_p_err:5.3f} %"]
    return "\n".join(out)
