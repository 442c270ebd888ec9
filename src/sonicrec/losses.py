"""Learning-to-rank objectives for the CNN: score the songs a user played above those they did not.

The users' WMF factors x_u stay fixed (fitted on the training songs only), and the network's output
y_i for song i scores it for user u as ``s_ui = x_u . y_i``: the score the cold-start evaluation
ranks by. For a minibatch of B training songs, each song i draws ``users_per_song`` of the users who
played it (uniformly, with replacement, from a generator seeded by ``(seed, epoch, rank)``), and each
drawn user ranks the batch's songs: song i is the positive, the batch's songs the user did not play
are the negatives (in-batch negatives: a batch is a uniform sample of the training songs, so these
are uniformly sampled unplayed songs). For one drawn pair (u, i) with negatives N_u:

``bpr``
    ``mean_{j in N_u} -ln sigmoid(s_ui - s_uj)``: BPR-Opt of S. Rendle, C. Freudenthaler,
    Z. Gantner and L. Schmidt-Thieme, "BPR: Bayesian personalized ranking from implicit feedback",
    UAI 2009, with every in-batch negative instead of one sampled one.
``softmax``
    ``-s_ui + ln(exp s_ui + sum_{j in N_u} exp s_uj)``: in-batch sampled softmax, as in two-tower
    retrieval (X. Yi et al., "Sampling-bias-corrected neural modeling for large corpus item
    recommendations", RecSys 2019), without their log-Q correction, which uniform negatives do not
    need.

Song i's loss is the mean over its drawn users times ``n_i / n_mean`` (n_i: its listeners; n_mean:
their mean over the training songs), so that over an epoch every (user, played song) pair weighs
the same, as in BPR-Opt's sum over all triples. Validation ranks with every listener of each song
instead of a draw, so its loss is deterministic. A constant prediction scores every song alike:
loss ln 2 (bpr) or ln(1 + |N_u|) (softmax), the baseline the training log prints. Under
data-parallel training each process ranks within its own share of the batch (fewer negatives).

``mse+bpr`` and ``mse+softmax`` (:class:`SumObjective`) add the MSE to unit-normalised factors
(``train.MSEObjective``) and ``rank_weight`` times the ranking loss; their predictions live in the
unit-normalised space (a user's ranking does not depend on the scale of y). Pure ranking losses fix
no scale or offset of y: their predictions are scores, comparable across songs for one user but
not with WMF's song factors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import sparse

from sonicrec.factors import Factors
from sonicrec.interactions import PlayMatrix

log = logging.getLogger(__name__)

RANKING_LOSSES = ("bpr", "softmax")


def known_user_plays(
    plays: PlayMatrix, factors: Factors, song_ids: Sequence[str], *, kind: str
) -> sparse.csc_matrix:
    """(U, S) int64 play counts of ``song_ids`` by the users of ``factors`` (rows of
    ``factors.user_factors``), by song, listeners sorted; plays of users without factors are left
    out (logged)."""
    counts = plays.aligned(factors.user_ids, song_ids).tocsc()
    counts.sort_indices()
    left_out = plays.aligned(song_ids=song_ids).nnz - counts.nnz
    if left_out:
        log.info("%s: %d play rows of users without factors are left out", kind, left_out)
    return counts


class RankingObjective:
    """In-batch ranking of training songs for users who played them (module docstring).

    Parameters
    ----------
    user_factors : (U, k) fixed WMF user factors
    indptr : (N + 1,) int — song row r's listeners are ``listeners[indptr[r]:indptr[r + 1]]``
    listeners : (nnz,) int — user rows, sorted within each song; every song has at least one
    kind : "bpr" or "softmax"
    users_per_song : listeners drawn per song and step; None: all of them (validation)
    mean_listeners : n_mean of the weights; None: the mean over these songs (pass the training
        set's to validation)
    seed : seeds the draws with the epoch and the process rank (:meth:`set_epoch`)
    """

    target = "raw"  # predictions are scores against the raw user factors

    def __init__(
        self, user_factors: np.ndarray, indptr: np.ndarray, listeners: np.ndarray, *, kind: str,
        users_per_song: int | None, mean_listeners: float | None = None,
        seed: int = 0,
    ) -> None:
        if kind not in RANKING_LOSSES:
            raise ValueError(f"ranking loss {kind!r}: one of {RANKING_LOSSES}")
        self.kind, self.users_per_song, self.seed = kind, users_per_song, seed
        self.name = kind
        self.user_factors = torch.as_tensor(np.asarray(user_factors, dtype=np.float32))
        self.indptr = torch.as_tensor(np.asarray(indptr, dtype=np.int64))
        self.listeners = torch.as_tensor(np.asarray(listeners, dtype=np.int64))
        self.n_listeners = self.indptr[1:] - self.indptr[:-1]  # (N,)
        if len(self.n_listeners) and int(self.n_listeners.min()) < 1:
            raise ValueError("every song of a ranking objective needs at least one listener")
        self.mean_listeners = float(
            mean_listeners if mean_listeners is not None else self.n_listeners.double().mean()
        )
        # (song row, user row) pairs as one sorted int64 key each, for "did u play j" look-ups
        n_users = len(self.user_factors)
        self.played_keys = torch.repeat_interleave(torch.arange(len(self)), self.n_listeners) * n_users
        self.played_keys += self.listeners
        self.generator: torch.Generator | None = None
        self.set_epoch(0)

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def to(self, device: torch.device) -> RankingObjective:
        for attr in ("user_factors", "indptr", "listeners", "n_listeners", "played_keys"):
            setattr(self, attr, getattr(self, attr).to(device))
        self.set_epoch(0)
        return self

    def set_epoch(self, epoch: int, rank: int = 0) -> None:
        """Reseed the draws for ``epoch`` (on process ``rank``), so a resumed run draws the same."""
        self.generator = torch.Generator(device=self.user_factors.device)
        seed = np.random.SeedSequence([self.seed, epoch, rank]).generate_state(1)[0]
        self.generator.manual_seed(int(seed))

    def per_song(self, pred: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Loss of each song: pred (B, k), rows (B,) -> (B,)."""
        song, users, weight = self._pairs(rows)  # (P,) batch position, user row, weight
        scores = self.user_factors[users] @ pred.T  # (P, B): s_uj for every song j of the batch
        positive = scores.gather(1, song[:, None])  # (P, 1)
        negative = ~self._played(users, rows)  # (P, B); False on the positive itself
        if self.kind == "bpr":
            pair = (F.softplus(scores - positive) * negative).sum(1) / negative.sum(1).clamp(min=1)
        else:
            logits = scores.masked_fill(~negative, float("-inf")).scatter(1, song[:, None], positive)
            pair = torch.logsumexp(logits, dim=1) - positive[:, 0]
        return torch.zeros(len(rows), dtype=pair.dtype, device=pair.device).index_add(0, song, weight * pair)

    def best_constant(self) -> torch.Tensor:
        """(k,) a constant prediction (any constant ranks every song alike)."""
        return torch.zeros(self.user_factors.shape[1], device=self.user_factors.device)

    def _pairs(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The (song, user) pairs ranked for a batch -> batch positions (P,), user rows (P,), weights (P,)."""
        start, count = self.indptr[rows], self.n_listeners[rows]  # (B,)
        if self.users_per_song is None:  # every listener of every song
            song = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), count)
            first_pair = torch.cumsum(count, 0) - count
            index = start[song] + torch.arange(len(song), device=rows.device) - first_pair[song]
            drawn = count[song]
        else:
            m = self.users_per_song
            u = torch.rand(len(rows), m, generator=self.generator, device=rows.device)
            offset = torch.minimum((u * count[:, None]).long(), count[:, None] - 1)  # (B, m)
            song = torch.arange(len(rows), device=rows.device).repeat_interleave(m)
            index = (start[:, None] + offset).reshape(-1)
            drawn = torch.full_like(song, m)
        weight = count[song] / (drawn * self.mean_listeners)
        return song, self.listeners[index], weight.float()

    def _played(self, users: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(P, B) bool: whether user ``users[p]`` played the batch's song ``rows[j]``."""
        keys = rows[None, :] * len(self.user_factors) + users[:, None]  # (P, B)
        at = torch.searchsorted(self.played_keys, keys).clamp(max=len(self.played_keys) - 1)
        return self.played_keys[at] == keys

    @classmethod
    def from_plays(
        cls, plays: PlayMatrix, factors: Factors, song_ids: Sequence[str], *, kind: str,
        users_per_song: int | None, mean_listeners: float | None = None, seed: int = 0,
    ) -> tuple[list[str], RankingObjective]:
        """The objective of ``song_ids`` from the users with factors who played them.

        Songs without such a listener are skipped (logged). Returns the kept ids, in the order of
        the objective's rows, and the objective.
        """
        wanted = pd.Index(list(song_ids))
        counts = known_user_plays(plays, factors, wanted, kind=kind)  # (U, S) by song
        has_listener = np.diff(counts.indptr) > 0
        if not has_listener.all():
            shown = ", ".join(wanted[~has_listener][:5])
            log.warning("%s: %d song(s) have no listener with factors and are skipped: %s",
                        kind, int((~has_listener).sum()), shown)
        listened = counts[:, np.flatnonzero(has_listener)]
        listened.sort_indices()
        return list(wanted[has_listener]), cls(
            factors.user_factors, listened.indptr, listened.indices, kind=kind,
            users_per_song=users_per_song, mean_listeners=mean_listeners, seed=seed,
        )


class SumObjective:
    """``first + weight * second`` per song (e.g. MSE plus a ranking loss); both address songs by
    the same rows. Its target (the prediction's space) and best constant are the first's."""

    def __init__(self, first, second, *, weight: float) -> None:
        if len(first) != len(second):
            raise ValueError(f"objectives over {len(first)} and {len(second)} songs cannot be added")
        self.first, self.second, self.weight = first, second, weight
        self.name, self.target = f"{first.name}+{second.name}", first.target

    def __len__(self) -> int:
        return len(self.first)

    def to(self, device: torch.device) -> SumObjective:
        self.first, self.second = self.first.to(device), self.second.to(device)
        return self

    def set_epoch(self, epoch: int, rank: int = 0) -> None:
        for part in (self.first, self.second):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch, rank)

    def per_song(self, pred: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Loss of each song: pred (B, k), rows (B,) -> (B,)."""
        return self.first.per_song(pred, rows) + self.weight * self.second.per_song(pred, rows)

    def best_constant(self) -> torch.Tensor:
        """(k,) the first's best constant (a ranking loss is the same for every constant)."""
        return self.first.best_constant()
