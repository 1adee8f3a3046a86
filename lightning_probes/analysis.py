"""Which probe measures rank models by generalization, and how early.

Pure functions over the replay table (SPEC §5: one row per (checkpoint, layer) with
``model_id, epoch, test_acc, ..., gap``). The first step turns the layer rows of every
checkpoint into one row of SPEC §4 aggregates, with :func:`lightning_probes.aggregates_from_table`
(the function ``probe()`` itself uses), plus weight baselines; every later step works on that
*measures table* (one row per (model_id, epoch)).

Coefficients come from :mod:`scipy.stats` (Kendall's tau-b, Spearman, Pearson). Each result is a
small named tuple, as in scipy.

>>> import numpy as np, pandas as pd
>>> measures = pd.DataFrame({"epoch": [1, 1, 1, 1], "model_id": list("abcd"),
...                          "test_acc": [0.5, 0.6, 0.7, 0.8], "SQ_BE_p": [1.0, 2.0, 4.0, 3.0]})
>>> c = correlation(measures["SQ_BE_p"], measures["test_acc"])
>>> c.n, round(c.kendall_tau, 3), round(c.spearman, 3)
(4, 0.667, 0.8)
"""
from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

from lightning_probes import TABLE_COLUMNS, aggregates_from_table
from lightning_probes.genprob import nin_from_code, parse_checkpoint_name

#: Per-checkpoint performance columns of the replay table (SPEC §5).
PERFORMANCE_COLUMNS = ("test_acc", "test_loss", "train_acc", "train_loss", "gap")
#: What the measures are correlated against: test accuracy and gap = test_acc - train_acc.
TARGETS = ("test_acc", "gap")
#: Columns :func:`checkpoint_measures` needs in the replay table (``*_AE`` ones are optional).
REQUIRED_COLUMNS = ("model_id", "epoch", *PERFORMANCE_COLUMNS,
                    *(c for c in TABLE_COLUMNS if c.endswith("_BE")))
#: Weight baselines (not probe measures) that :func:`checkpoint_measures` adds.
WEIGHT_BASELINES = ("param_count", "sum_log_fro", "sum_log_spec", "dist_init")
#: Accuracies at epoch k, the early-prediction baseline an HPO scheduler uses.
ACCURACY_BASELINES = ("test_acc", "train_acc")
#: Hyper-parameters of a GenProb model id, in file-token order after the channel code.
TOKEN_HYPERPARAMETERS = ("optimizer", "lr", "batch_size", "weight_decay", "seed")
#: Grid axes the granulated Kendall coefficient and the CMI range over ("channels" is the
#: NIN channel code, i.e. the width). The seed is not a hyper-parameter: it is held fixed.
GRID_AXES = ("channels", "optimizer", "lr", "batch_size", "weight_decay")

_ID_COLUMNS = ("model_id", "epoch", *PERFORMANCE_COLUMNS)


# --------------------------------------------------------------------------- hyper-parameters
def model_hyperparameters(model_id: str) -> dict[str, str] | None:
    """The hyper-parameters encoded in a GenProb model id, as strings; ``None`` for other ids.

    A model id is a GenProb file name without ``_epoch_<E>.pth.tar`` (SPEC §6):
    ``<prefix>_NIN<d1..d5>_<optimizer>_<lr>_<batch size>_<weight decay>_<seed>_<DATASET>``.
    Values stay strings: they are grid labels, compared for equality only.

    >>> model_hyperparameters("zoo_NIN01234_sgd_0.1_32_0.0005_1_DIGITS")["lr"]
    '0.1'
    >>> model_hyperparameters("resnet18-run3") is None
    True
    """
    name = parse_checkpoint_name(f"{model_id}_epoch_0.pth.tar")
    if name is None or len(name.tokens) != len(TOKEN_HYPERPARAMETERS):
        return None
    return {"channels": name.channel_code, **dict(zip(TOKEN_HYPERPARAMETERS, name.tokens)),
            "dataset": name.dataset}


@functools.lru_cache(maxsize=None)
def nin_parameter_count(channel_code: str) -> int:
    """Parameters of the NIN of a channel code (SPEC §6), classifier excluded (its size depends
    on the class count, which the model id does not say).

    >>> nin_parameter_count("00000") < nin_parameter_count("00009")
    True
    """
    net = nin_from_code(channel_code)
    return sum(p.numel() for name, p in net.named_parameters() if not name.startswith("classifier."))


def hyperparameter_table(model_ids: Iterable[str]) -> pd.DataFrame:
    """One row per model id (the index) with ``channels, optimizer, lr, batch_size,
    weight_decay, seed, dataset``; empty (no columns) unless every id is a GenProb id.

    >>> ids = ["a_NIN00000_sgd_0.1_32_0_1_X", "a_NIN11111_sgd_0.1_32_0_1_X"]
    >>> hyperparameter_table(ids)["channels"].tolist()
    ['00000', '11111']
    """
    ids = list(dict.fromkeys(model_ids))
    parsed = [model_hyperparameters(model_id) for model_id in ids]
    if not ids or any(p is None for p in parsed):
        return pd.DataFrame(index=pd.Index(ids, name="model_id"))
    return pd.DataFrame(parsed, index=pd.Index(ids, name="model_id"))


# --------------------------------------------------------------------------- measures table
def checkpoint_measures(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (model_id, epoch): its performance, every SPEC §4 aggregate, and baselines.

    Aggregates come from :func:`lightning_probes.aggregates_from_table` over the checkpoint's
    layer rows. Weight baselines, from the same rows:

    - ``sum_log_fro``: sum over probed layers of ln ||W||_F (``out_fro_BE``; the log of the
      product of Frobenius norms);
    - ``sum_log_spec``: sum of ln of the spectral norm of the out-unfolding (``out_spec_BE``,
      the (out, in*k) matrix; the log of the spectral-norm product);
    - ``param_count``: sum of a per-layer ``n_params`` column (the weight's element count) when
      the table has one, else :func:`nin_parameter_count` of a GenProb model id's channel code;
    - ``dist_init``: sqrt of the sum of a per-layer ``dist_init`` column, when the table has
      one, where ``dist_init`` = ||W_epoch - W_epoch0||_F of that layer, i.e. the Euclidean
      distance of all probed weights from their epoch-0 values.

    >>> from lightning_probes import TABLE_COLUMNS
    >>> layer = {c: 1.0 for c in TABLE_COLUMNS if c != "layer"}
    >>> rows = pd.DataFrame([dict(layer, layer="w", model_id="m", epoch=0, test_acc=0.5, test_loss=1.0,
    ...                           train_acc=0.6, train_loss=0.9, gap=-0.1)] * 2)
    >>> m = checkpoint_measures(rows)
    >>> m[["model_id", "epoch", "SQ_BE_p", "sum_log_fro"]].to_dict("records")
    [{'model_id': 'm', 'epoch': 0, 'SQ_BE_p': 1.0, 'sum_log_fro': 0.0}]
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"replay table lacks column(s) {', '.join(missing)}")
    records = []
    for (model_id, epoch), layers in rows.groupby(["model_id", "epoch"], sort=True):
        record = {"model_id": model_id, "epoch": epoch}
        record.update({c: layers[c].iloc[0] for c in PERFORMANCE_COLUMNS})
        record.update(aggregates_from_table(layers))
        with np.errstate(divide="ignore"):
            record["sum_log_fro"] = float(np.log(layers["out_fro_BE"].to_numpy(float)).sum())
            record["sum_log_spec"] = float(np.log(layers["out_spec_BE"].to_numpy(float)).sum())
        hyperparameters = model_hyperparameters(str(model_id))
        if "n_params" in layers.columns:
            record["param_count"] = float(layers["n_params"].sum())
        elif hyperparameters is not None:
            record["param_count"] = float(nin_parameter_count(hyperparameters["channels"]))
        if "dist_init" in layers.columns:
            record["dist_init"] = float(np.sqrt((layers["dist_init"].to_numpy(float) ** 2).sum()))
        records.append(record)
    measures = pd.DataFrame.from_records(records)
    if len(measures) and (measures["epoch"] == measures["epoch"].round()).all():
        measures["epoch"] = measures["epoch"].astype(int)  # a CSV round trip may make them floats
    return measures


def measure_columns(measures: pd.DataFrame) -> list[str]:
    """The measure columns of a measures table: every aggregate, then the weight baselines.

    >>> measure_columns(pd.DataFrame(columns=["model_id", "epoch", "test_acc", "SQ_BE_p", "sum_log_fro"]))
    ['SQ_BE_p', 'sum_log_fro']
    """
    hyperparameters = {"channels", "dataset", "stratum", *TOKEN_HYPERPARAMETERS}
    return [c for c in measures.columns if c not in _ID_COLUMNS and c not in hyperparameters]


# --------------------------------------------------------------------------- correlations
class Correlation(NamedTuple):
    """Rank and linear correlation of one measure with one target over ``n`` models."""

    n: int
    kendall_tau: float
    kendall_p: float
    spearman: float
    pearson: float


def correlation(measure: Sequence[float], target: Sequence[float]) -> Correlation:
    """Kendall's tau-b (with its p-value), Spearman's rho and Pearson's r, from scipy.stats.

    Pairs where either value is not finite are dropped first; ``n`` counts the rest. The
    coefficients are NaN (without a warning) for fewer than 3 models or a constant input (equal
    to 12 significant digits: float round-off is not a ranking).

    >>> correlation([1, 2, 3, np.nan], [2, 4, 7, 1])
    Correlation(n=3, kendall_tau=1.0, kendall_p=0.3333333333333333, spearman=1.0, pearson=0.9933992677987828)
    """
    x, y = _finite_pairs(measure, target)
    n = len(x)
    if n < 3 or _constant(x) or _constant(y):
        return Correlation(n, np.nan, np.nan, np.nan, np.nan)
    kendall = stats.kendalltau(x, y)
    return Correlation(
        n,
        float(kendall.statistic),
        float(kendall.pvalue),
        float(stats.spearmanr(x, y).statistic),
        float(stats.pearsonr(x, y).statistic),
    )


class Interval(NamedTuple):
    """A two-sided confidence interval."""

    low: float
    high: float


def kendall_tau_interval(
    measure: Sequence[float],
    target: Sequence[float],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval for Kendall's tau-b, resampling models with replacement.

    Deterministic for a given ``seed``. Every resample's tau-b equals ``scipy.stats.kendalltau``
    on the resampled arrays (duplicates are ties); it is computed for all resamples at once
    from the resample counts c: tau_b = c'Pc / sqrt(c'|X|c * c'|Y|c) with X = sign(x_i - x_j),
    Y = sign(y_i - y_j), P = X*Y. Resamples where tau is undefined (one value only) are dropped.

    >>> low, high = kendall_tau_interval([1, 2, 3, 4, 5, 6, 7, 8], [1, 3, 2, 4, 6, 5, 8, 7])
    >>> bool(low < 0.71 < high)
    True
    """
    x, y = _finite_pairs(measure, target)
    if len(x) < 3:
        return Interval(np.nan, np.nan)
    taus = kendall_tau_of_samples(x, y, _bootstrap_counts(len(x), n_resamples, seed))
    taus = taus[np.isfinite(taus)]
    if taus.size == 0:
        return Interval(np.nan, np.nan)
    tail = 50 * (1 - confidence)
    low, high = np.percentile(taus, [tail, 100 - tail])
    return Interval(float(low), float(high))


@functools.lru_cache(maxsize=64)
def _bootstrap_counts(n: int, n_resamples: int, seed: int) -> np.ndarray:
    # How often each of n models is drawn in each resample; shared by every measure.
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=n_resamples).astype(float)
    counts.flags.writeable = False
    return counts


def kendall_tau_of_samples(x: np.ndarray, y: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of ``(x, y)`` over each sample described by a row of ``counts``: how
    often each model is in it (a bootstrap resample; 0/1 for a subgroup). Equals
    ``scipy.stats.kendalltau`` of the sample (duplicates are ties); NaN for a sample with a
    single distinct value.

    >>> float(kendall_tau_of_samples(np.array([1., 2, 3]), np.array([1., 3, 2]), np.ones((1, 3)))[0])
    0.3333333333333333
    """
    sign_x = np.sign(x[:, None] - x[None, :])
    sign_y = np.sign(y[:, None] - y[None, :])
    counts = np.asarray(counts, dtype=float)
    # c'Mc for the three matrices at once: one (samples, n) x (n, 3n) product.
    stacked = counts @ np.hstack([sign_x * sign_y, np.abs(sign_x), np.abs(sign_y)])
    concordance, untied_x, untied_y = (stacked.reshape(len(counts), 3, -1) * counts[:, None, :]).sum(axis=2).T
    with np.errstate(invalid="ignore", divide="ignore"):
        return concordance / np.sqrt(untied_x * untied_y)


def kendall_null_halfwidth(n: int, confidence: float = 0.95) -> float:
    """Half-width of the band tau stays in for ``n`` models with no relation at all.

    Under independence (no ties) tau is about normal with variance 2(2n+5) / (9n(n-1)), so
    |tau| below this value is indistinguishable from noise at the given confidence.

    >>> round(kendall_null_halfwidth(48), 3)
    0.195
    """
    variance = 2 * (2 * n + 5) / (9 * n * (n - 1))
    return float(stats.norm.ppf(0.5 + confidence / 2) * np.sqrt(variance))


def correlation_table(
    measures: pd.DataFrame,
    measures_to_test: Sequence[str],
    targets: Sequence[str] = TARGETS,
    by: Sequence[str] = ("epoch",),
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """:func:`correlation` and :func:`kendall_tau_interval` of every measure with every target,
    within each group of ``by`` (default: per epoch).

    Columns: the ``by`` columns, ``measure, target, n, kendall_tau, kendall_p, spearman,
    pearson, tau_ci_low, tau_ci_high``. ``n_resamples=0`` skips the interval (NaN).

    >>> m = pd.DataFrame({"epoch": [0] * 4, "F_BE_p": [1., 2, 3, 4], "test_acc": [.1, .2, .4, .3]})
    >>> table = correlation_table(m, ["F_BE_p"], ["test_acc"], n_resamples=0)
    >>> table[["epoch", "n", "kendall_tau"]].to_dict("records")
    [{'epoch': 0, 'n': 4, 'kendall_tau': 0.6666666666666669}]
    """
    records = []
    for keys, group in measures.groupby(list(by), sort=True):
        for target in targets:
            for measure in measures_to_test:
                result = correlation(group[measure], group[target])
                interval = (
                    kendall_tau_interval(group[measure], group[target], n_resamples, confidence, seed)
                    if n_resamples else Interval(np.nan, np.nan)
                )
                records.append({
                    **dict(zip(by, keys)), "measure": measure, "target": target,
                    **result._asdict(), "tau_ci_low": interval.low, "tau_ci_high": interval.high,
                })
    return pd.DataFrame.from_records(records)


# --------------------------------------------------------------------------- grid-based
class Grid(NamedTuple):
    """Group structure of a population of models (the rows of a frame), computed once and
    reused for every measure: ``membership[axis]`` is a (groups, models) 0/1 matrix of the
    groups where only ``axis`` varies; ``conditioning[S]`` codes each model's values of the
    axes in S (S = () codes every model 0)."""

    axes: tuple[str, ...]
    membership: dict[str, np.ndarray]
    conditioning: dict[tuple[str, ...], np.ndarray]


def grid_structure(models: pd.DataFrame, axes: Sequence[str], fixed: Sequence[str] = (),
                   max_conditioning: int = 2) -> Grid:
    """The :class:`Grid` of ``models`` over the hyper-parameter columns ``axes``; the
    ``fixed`` columns (e.g. the seed) are held constant within every granulated group.

    >>> grid = grid_structure(pd.DataFrame({"a": [0, 0, 1, 1], "b": [0, 1, 0, 1]}), ["a", "b"])
    >>> grid.membership["a"].tolist()
    [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]
    >>> grid.conditioning[("b",)].tolist()
    [0, 1, 0, 1]
    """
    def codes(columns):
        if not columns:
            return np.zeros(len(models), int)
        return models.groupby(list(columns), sort=True).ngroup().to_numpy()

    membership = {}
    for axis in axes:
        group = codes([a for a in axes if a != axis] + list(fixed))
        membership[axis] = (group[None, :] == np.arange(group.max() + 1)[:, None]).astype(float)
    conditioning = {subset: codes(subset) for size in range(max_conditioning + 1)
                    for subset in itertools.combinations(axes, size)}
    return Grid(tuple(axes), membership, conditioning)


class GranulatedKendall(NamedTuple):
    """Jiang et al.'s granulated Kendall coefficient: ``psi[axis]`` is the mean tau over the
    groups of models where only ``axis`` varies; ``mean`` averages the defined psi values;
    ``n_groups[axis]`` counts the groups that entered psi."""

    psi: dict[str, float]
    mean: float
    n_groups: dict[str, int]


def granulated_kendall(
    models: pd.DataFrame,
    measure: str,
    target: str,
    axes: Sequence[str],
    fixed: Sequence[str] = (),
    grid: Grid | None = None,
) -> GranulatedKendall:
    """Granulated Kendall (Jiang et al., "Fantastic Generalization Measures", ICLR 2020).

    ``models``: one row per model, with the ``axes`` and ``fixed`` columns (grid labels) and
    the ``measure`` and ``target`` columns (``grid``: their :func:`grid_structure`, when
    already computed). For each axis, models are grouped by the values of the other axes and
    of ``fixed`` (e.g. the seed: held constant, never scored); psi is the mean over groups of
    Kendall's tau-b within the group (equal to scipy's, see :func:`kendall_tau_of_samples`).
    Models with a non-finite value are left out; groups of one model, or where tau is
    undefined (constant measure or target within the group), are skipped; on an incomplete
    grid psi averages the groups that exist. psi is NaN when no group is left.

    >>> grid = pd.DataFrame({"a": [0, 0, 1, 1], "b": [0, 1, 0, 1],
    ...                      "m": [2., 1, 3, 4], "acc": [1., 2, 3, 4]})
    >>> granulated_kendall(grid, "m", "acc", ["a", "b"])
    GranulatedKendall(psi={'a': 1.0, 'b': 0.0}, mean=0.5, n_groups={'a': 2, 'b': 2})
    """
    grid = grid or grid_structure(models, axes, fixed, max_conditioning=0)
    x, y, keep = _finite_columns(models, measure, target)
    psi, n_groups = {}, {}
    for axis in axes:
        taus = kendall_tau_of_samples(x, y, grid.membership[axis][:, keep])
        taus = taus[np.isfinite(taus)]
        psi[axis] = float(taus.mean()) if taus.size else np.nan
        n_groups[axis] = int(taus.size)
    defined = [v for v in psi.values() if np.isfinite(v)]
    return GranulatedKendall(psi, float(np.mean(defined)) if defined else np.nan, n_groups)


class ConditionalMutualInformation(NamedTuple):
    """PGDL-style conditional mutual information: ``value`` is the minimum over conditioning
    sets, ``conditioning`` the set that attains it, ``per_set`` every set's normalised CMI."""

    value: float
    conditioning: tuple[str, ...]
    per_set: dict[tuple[str, ...], float]


def conditional_mutual_information(
    models: pd.DataFrame,
    measure: str,
    target: str,
    axes: Sequence[str],
    max_conditioning: int = 2,
    grid: Grid | None = None,
) -> ConditionalMutualInformation:
    """Normalised conditional mutual information between measure and target orderings,
    minimised over conditioning sets of at most ``max_conditioning`` hyper-parameters
    (Jiang et al. 2020 §6; the NeurIPS 2020 PGDL competition's score).

    Over ordered pairs (i, j) of distinct models, V_m = [measure_i > measure_j] and
    V_t = [target_i > target_j]; U_S = (values of S for i, values of S for j). For each set S
    of axes with |S| <= ``max_conditioning`` (the empty set included):
    I(V_m; V_t | U_S) / H(V_t | U_S), both averaged over U_S weighted by its share of pairs
    (bits; the ratio does not depend on the base). ``grid``: the :func:`grid_structure` of
    ``models``, when already computed.

    Ties: as in the PGDL scorer, "greater" is strict, so a tied pair counts as "not greater"
    in both orders (a constant measure scores 0). Unlike that scorer, a model is not paired with
    itself (such pairs carry no ranking information). Incomplete grids: values of U_S with no
    pair simply do not occur (the PGDL scorer averages over every combination, empty ones
    included); models with a non-finite value are left out. A set S for which
    H(V_t | U_S) = 0 (the conditioning fixes the target order, e.g. one pair per stratum) has
    no defined ratio and is skipped; among equal minima the first set in the order (smaller
    sets first, then ``axes`` order) is reported. Note that mutual information ignores sign: a
    measure that ranks perfectly backwards within each stratum scores 1 too.

    >>> grid = pd.DataFrame({"a": [0, 0, 1, 1], "b": [0, 1, 0, 1],
    ...                      "m": [2., 1, 3, 4], "acc": [1., 2, 3, 4]})
    >>> cmi = conditional_mutual_information(grid, "m", "acc", ["a", "b"])
    >>> round(cmi.value, 4), cmi.conditioning
    (0.35, ())
    """
    grid = grid or grid_structure(models, axes, max_conditioning=max_conditioning)
    x, y, keep = _finite_columns(models, measure, target)
    first, second = np.nonzero(~np.eye(len(x), dtype=bool))
    cell = 2 * (y[first] > y[second]) + (x[first] > x[second])
    per_set = {}
    for subset, codes in grid.conditioning.items():
        if len(subset) > max_conditioning:
            continue
        codes = codes[keep]
        stratum = codes[first] * (codes.max(initial=0) + 1) + codes[second]
        per_set[subset] = _normalised_mutual_information(stratum, cell)
    defined = {s: v for s, v in per_set.items() if np.isfinite(v)}
    if not defined:
        return ConditionalMutualInformation(np.nan, (), per_set)
    best = min(defined, key=defined.get)
    return ConditionalMutualInformation(defined[best], best, per_set)


def _normalised_mutual_information(stratum: np.ndarray, cell: np.ndarray) -> float:
    # cell = 2*V_t + V_m; counts[u] is the 2x2 table (V_t, V_m) of stratum u.
    if stratum.size == 0:
        return np.nan
    _, stratum = np.unique(stratum, return_inverse=True)
    counts = np.bincount(4 * stratum + cell, minlength=4 * (stratum.max() + 1)).reshape(-1, 2, 2)
    totals = counts.sum(axis=(1, 2))
    joint = counts / totals[:, None, None]
    p_target = joint.sum(axis=2, keepdims=True)
    p_measure = joint.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        mutual = np.where(joint > 0, joint * np.log2(joint / (p_target * p_measure)), 0.0).sum(axis=(1, 2))
        entropy = -np.where(p_target > 0, p_target * np.log2(p_target), 0.0).sum(axis=(1, 2))
    share = totals / totals.sum()
    conditional_entropy = float(share @ entropy)
    return float(share @ mutual) / conditional_entropy if conditional_entropy > 1e-12 else np.nan


def grid_tables(
    measures: pd.DataFrame,
    measures_to_test: Sequence[str],
    targets: Sequence[str] = TARGETS,
    axes: Sequence[str] = GRID_AXES,
    fixed: Sequence[str] = ("seed",),
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per epoch, granulated Kendall and CMI of every measure with every target.

    ``measures`` must carry the hyper-parameter columns (see :func:`with_hyperparameters`).
    Axes nested in an earlier axis are crossed first (:func:`cross_nested_axes`); axes and
    fixed columns with a single value in the table are dropped.

    Returns ``(granulated, cmi)``: ``granulated`` has ``epoch, measure, target,
    hyperparameter, psi, n_groups``, one row per axis plus a ``hyperparameter == "mean"`` row
    (its ``n_groups`` sums the axes'); ``cmi`` has ``epoch, measure, target, cmi,
    conditioning`` (the minimising set, joined by ``+``; empty for the unconditioned one).
    """
    measures, axes = cross_nested_axes(measures, [a for a in axes if measures[a].nunique() > 1])
    axes = [a for a in axes if measures[a].nunique() > 1]
    fixed = [f for f in fixed if measures[f].nunique() > 1]
    granulated, cmi = [], []
    for epoch, models in measures.groupby("epoch", sort=True):
        grid = grid_structure(models, axes, fixed)
        for target in targets:
            for measure in measures_to_test:
                key = {"epoch": epoch, "measure": measure, "target": target}
                psi = granulated_kendall(models, measure, target, axes, fixed, grid)
                for axis in axes:
                    granulated.append({**key, "hyperparameter": axis, "psi": psi.psi[axis],
                                       "n_groups": psi.n_groups[axis]})
                granulated.append({**key, "hyperparameter": "mean", "psi": psi.mean,
                                   "n_groups": sum(psi.n_groups.values())})
                information = conditional_mutual_information(models, measure, target, axes, grid=grid)
                cmi.append({**key, "cmi": information.value,
                            "conditioning": "+".join(information.conditioning)})
    return pd.DataFrame.from_records(granulated), pd.DataFrame.from_records(cmi)


def cross_nested_axes(models: pd.DataFrame, axes: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """Make a nested grid crossed: an axis whose every value occurs with a single value of an
    earlier axis (e.g. a learning rate written as optimizer base rate x scale, so each lr value
    belongs to one optimizer) is replaced by its rank within that axis, in a new column
    ``<axis>_within_<earlier>`` (ranks by numeric value when the labels are numbers).
    Otherwise no two models would differ only by the earlier axis. An axis that is a relabeling
    of an earlier one becomes constant.

    >>> models = pd.DataFrame({"optimizer": ["adam", "adam", "sgd", "sgd"],
    ...                        "lr": ["0.0005", "0.001", "0.01", "0.02"]})
    >>> crossed, axes = cross_nested_axes(models, ["optimizer", "lr"])
    >>> axes, crossed["lr_within_optimizer"].tolist()
    (['optimizer', 'lr_within_optimizer'], [0, 1, 0, 1])
    """
    models = models.copy()
    crossed = list(axes)
    for position, axis in enumerate(axes):
        for outer in crossed[:position]:
            if models[outer].nunique() > 1 and models.groupby(axis)[outer].nunique().max() == 1:
                name = f"{axis}_within_{outer}"
                models[name] = models.groupby(outer)[axis].transform(_label_rank)
                crossed[position] = name
                break
    return models, crossed


def _label_rank(labels: pd.Series) -> pd.Series:
    numbers = pd.to_numeric(labels, errors="coerce")
    order = numbers if numbers.notna().all() else labels
    return order.rank(method="dense").astype(int) - 1


def with_hyperparameters(measures: pd.DataFrame) -> pd.DataFrame:
    """``measures`` joined with :func:`hyperparameter_table` of its model ids, plus a ``stratum``
    column (the channel code, i.e. the width group); unchanged when the ids are not GenProb ids.

    >>> m = pd.DataFrame({"model_id": ["z_NIN00000_sgd_0.1_32_0_1_X"], "epoch": [0]})
    >>> with_hyperparameters(m)[["channels", "optimizer", "stratum"]].to_dict("records")
    [{'channels': '00000', 'optimizer': 'sgd', 'stratum': 'NIN00000'}]
    """
    hyperparameters = hyperparameter_table(measures["model_id"])
    if hyperparameters.columns.empty:
        return measures
    joined = measures.join(hyperparameters, on="model_id")
    return joined.assign(stratum="NIN" + joined["channels"])


# --------------------------------------------------------------------------- early prediction
def early_prediction(
    measures: pd.DataFrame,
    measures_to_test: Sequence[str],
    target: str = "test_acc",
    final_epoch: int | None = None,
) -> pd.DataFrame:
    """Kendall's tau between each measure at epoch k and ``target`` at the final epoch.

    ``final_epoch`` defaults to the last epoch every model reached. Put the accuracy columns
    (``test_acc``, ``train_acc``) in ``measures_to_test`` for the baseline an HPO scheduler
    uses: the accuracy at epoch k itself. ``orientation`` is the sign of the measure's tau at
    the final epoch (chosen in sample, which favours the measures); ``oriented_tau`` =
    orientation * tau is what :func:`first_epochs_reaching` thresholds.

    Columns: ``measure, epoch, n, kendall_tau, spearman, orientation, oriented_tau``.

    >>> m = pd.DataFrame({"model_id": list("abcabc"), "epoch": [0, 0, 0, 1, 1, 1],
    ...                   "test_acc": [.3, .2, .1, .7, .8, .9], "F_BE_p": [3., 2, 1, 3, 2, 1]})
    >>> early = early_prediction(m, ["F_BE_p", "test_acc"])
    >>> early[["measure", "epoch", "oriented_tau"]].values.tolist()
    [['F_BE_p', 0, 1.0], ['F_BE_p', 1, 1.0], ['test_acc', 0, -1.0], ['test_acc', 1, 1.0]]
    """
    if final_epoch is None:
        final_epoch = int(measures.groupby("model_id")["epoch"].max().min())
    final = measures[measures["epoch"] == final_epoch].set_index("model_id")[target]
    records = []
    for epoch, models in measures[measures["epoch"] <= final_epoch].groupby("epoch", sort=True):
        models = models.set_index("model_id")
        final_target = final.reindex(models.index)
        for measure in measures_to_test:
            result = correlation(models[measure], final_target)
            records.append({"measure": measure, "epoch": epoch, "n": result.n,
                            "kendall_tau": result.kendall_tau, "spearman": result.spearman})
    early = pd.DataFrame.from_records(records).sort_values(["measure", "epoch"], kind="stable")
    final_tau = early[early["epoch"] == final_epoch].set_index("measure")["kendall_tau"]
    early["orientation"] = np.sign(early["measure"].map(final_tau)).fillna(0.0)
    early["oriented_tau"] = early["orientation"] * early["kendall_tau"]
    columns = ["measure", "epoch", "n", "kendall_tau", "spearman", "orientation", "oriented_tau"]
    return early[columns].reset_index(drop=True)


def first_epochs_reaching(early: pd.DataFrame, thresholds: Sequence[float] = (0.5, 0.7)) -> pd.DataFrame:
    """Per measure of :func:`early_prediction`: its final-epoch tau, and per threshold t the
    first epoch where ``oriented_tau >= t`` (``first_epoch_tau_<t>``) and the first epoch from
    which it stays ``>= t`` up to the final epoch (``stable_epoch_tau_<t>``); NaN: never.

    >>> early = pd.DataFrame({"measure": ["F"] * 4, "epoch": [0, 1, 2, 3], "kendall_tau": [.6, .2, .8, .9],
    ...                       "oriented_tau": [.6, .2, .8, .9]})
    >>> first_epochs_reaching(early, [0.5]).to_dict("records")
    [{'measure': 'F', 'final_tau': 0.9, 'first_epoch_tau_0.5': 0.0, 'stable_epoch_tau_0.5': 2.0}]
    """
    records = []
    for measure, curve in early.sort_values("epoch").groupby("measure", sort=False):
        record = {"measure": measure, "final_tau": float(curve["kendall_tau"].iloc[-1])}
        for threshold in thresholds:
            above = (curve["oriented_tau"] >= threshold).to_numpy()
            epochs = curve["epoch"].to_numpy(float)
            # from the last epoch below the threshold on, it stays above
            below = np.flatnonzero(~above)
            stable_from = below[-1] + 1 if below.size else 0
            record[f"first_epoch_tau_{threshold:g}"] = epochs[above][0] if above.any() else np.nan
            stable = epochs[stable_from] if stable_from < len(epochs) else np.nan
            record[f"stable_epoch_tau_{threshold:g}"] = stable
        records.append(record)
    return pd.DataFrame.from_records(records)


def _constant(values: np.ndarray) -> bool:
    return bool(np.ptp(values) <= 1e-12 * np.max(np.abs(values)))


def _finite_columns(models: pd.DataFrame, measure: str, target: str
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = models[measure].to_numpy(float)
    y = models[target].to_numpy(float)
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep], keep


def _finite_pairs(measure: Sequence[float], target: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(measure, dtype=float)
    y = np.asarray(target, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]
