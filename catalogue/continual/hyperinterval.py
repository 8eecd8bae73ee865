"""HyperInterval (HINT): interval arithmetic in the embedding space of a hypernetwork
(Krukowski, Bielawska, Książek, Wawrzyński, Batorski, Spurek, 2024), written from the
specification in asyncgen's issue 14 (the authors' code was not consulted).

Task ``t`` owns the box ``[e_t - eps, e_t + eps]`` with ``e_t = gamma * tanh(ê_t)`` and
``eps = gamma`` in every coordinate, so ``0`` lies in every task's box and their
intersection is never empty. Interval bound propagation through the hypernetwork gives
interval target weights ``[theta_t^-, theta_t^+]``, and through the target network logit
bounds. The loss of task ``t`` is

    kappa * CE(f(x; H(e_t)), y) + (1 - kappa) * CE(worst-case logits, y)

with ``kappa`` annealed linearly from 1 to ``kappa_min`` (0.5) over the first half of the
task's training, plus HNET's regulariser on every earlier task's *propagated bounds*: the
interval output ``[H^-(box_i), H^+(box_i)]`` of the hypernetwork over task i's whole box (and
``H(e_i)``) is kept where it was when task i ended. Pinning the bounds, not a few points of the
box, is what carries the guarantee over to later tasks: every target network the box maps to
stays inside the weight interval that task i was verified with. After the last task one *universal embedding* ``u``, the midpoint of
``[max_i (e_i - eps), min_i (e_i + eps)]``, gives a single network for all tasks: for every
``z`` in task i's box, ``H(z)`` lies in ``[theta_i^-, theta_i^+]``, so every sample whose
worst-case margin over task i's box is positive ("verified") is classified correctly by
``H(u)``.

``gamma = 0`` turns the boxes into points (``e_t = ê_t``, ``eps = 0``) and with
``kappa_min = 1`` this is exactly HNET.

At scale: like :class:`~asyncgen.catalogue.continual.hnet.HNet`, the hypernetwork is a
plain ``nn.Module`` trainable under DDP/accelerate; interval propagation costs about two
forward passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import intervals
from .hnet import HNet, check_task_data
from .target import TargetMLP


class HyperInterval(HNet):
    """HNET with interval task embeddings, worst-case training and a universal embedding.

    Args (beyond :class:`HNet`'s):
        gamma: half-width of every task box and bound of the embedding centres (default 0.5; >= 0;
            0 gives point embeddings, i.e. HNET).
        kappa_min: the weight of the point loss after the first half of each task (default 0.5; in [0, 1]).
    """

    def __init__(self, target: TargetMLP, embedding_dim: int = 24, hidden: tuple[int, ...] = (100, 100),
                 beta_reg: float = 0.01, lr: float = 1e-3, seed: int = 0, gamma: float = 0.5,
                 kappa_min: float = 0.5):
        if not gamma >= 0:
            raise ValueError(f"gamma={gamma}: must be >= 0")
        if not 0 <= kappa_min <= 1:
            raise ValueError(f"kappa_min={kappa_min}: kappa must lie in [0, 1]")
        super().__init__(target, embedding_dim, hidden, beta_reg, lr, seed)
        self.gamma = float(gamma)
        self.kappa_min = float(kappa_min)

    # ---- the boxes ---------------------------------------------------------------------------------------------
    def embedding(self, task: int) -> torch.Tensor:
        raw = super().embedding(task)
        return self.gamma * torch.tanh(raw) if self.gamma > 0 else raw

    def interval(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Task ``task``'s box as ``(lower, upper)``."""
        centre = self.embedding(task)
        return centre - self.gamma, centre + self.gamma

    def anchor_outputs(self, tasks: list[int]) -> torch.Tensor:
        """Per task, rows ``H^-(box), H(e), H^+(box)``: the hypernetwork's interval output over the task's whole
        box (interval bound propagation) and its output at the centre; one row ``H(e)`` when ``gamma = 0``."""
        if self.gamma == 0:  # a point box: the bounds are H(e) itself, HNET's single anchor
            return super().anchor_outputs(tasks)
        centres = torch.stack([self.embedding(task) for task in tasks])
        theta_centre, theta_radius = self.hypernetwork.forward_interval(centres, torch.full_like(centres, self.gamma))
        rows = torch.stack([theta_centre - theta_radius, self.hypernetwork(centres), theta_centre + theta_radius], 1)
        return rows.reshape(-1, rows.shape[-1])

    def kappa(self, progress: float) -> float:
        """1 at the start of a task, falling linearly to ``kappa_min`` at half of it, then constant."""
        return 1.0 - (1.0 - self.kappa_min) * min(1.0, 2.0 * progress)

    @torch.no_grad()
    def universal_embedding(self) -> torch.Tensor:
        """The midpoint of the intersection of every learned task's box."""
        if self.tasks_seen == 0:
            raise ValueError("universal_embedding(): no task has been learned yet")
        lowers, uppers = zip(*(self.interval(i) for i in range(self.tasks_seen)))
        lower, upper = torch.stack(lowers).amax(0), torch.stack(uppers).amin(0)
        # 0 lies in every box when eps = gamma; float32 rounding of gamma * tanh can leave the
        # bounds crossed by an ulp, so only a real gap is an error
        if bool((lower - upper > 1e-6).any()):
            raise ValueError(f"universal_embedding(): the task boxes do not intersect (gamma={self.gamma}; "
                             "gamma = 0 makes them points)")
        return (lower + upper) / 2

    # ---- bounds and loss ----------------------------------------------------------------------------------------
    def weight_bounds(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(theta_centre, theta_radius)`` covering ``H(z)`` for every ``z`` in the task's box."""
        centre = self.embedding(task)
        return self.hypernetwork.forward_interval(centre, torch.full_like(centre, self.gamma))

    def logit_bounds(self, x: torch.Tensor, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lower, upper)`` logits over every target network the task's box maps to."""
        theta_centre, theta_radius = self.weight_bounds(task)
        return self.target.forward_interval(x, theta_centre, theta_radius)

    def task_loss(self, x: torch.Tensor, y: torch.Tensor, task: int, progress: float) -> torch.Tensor:
        kappa = self.kappa(progress)
        point = F.cross_entropy(self.logits(x, task), y)
        if kappa == 1.0:
            return point
        theta_centre, theta_radius = self.weight_bounds(task)
        lower, upper = self.target.forward_interval(x, theta_centre, theta_radius)
        worst = F.cross_entropy(intervals.worst_case_logits(lower, upper, y), y)
        return kappa * point + (1.0 - kappa) * worst

    @torch.no_grad()
    def verified(self, x: torch.Tensor, y: torch.Tensor, task: int) -> torch.Tensor:
        """Per sample: is the worst-case margin over the task's whole box positive?"""
        check_task_data(x, y, self.target.out_features)
        lower, upper = self.logit_bounds(x, task)
        return intervals.worst_case_margin(lower, upper, y) > 0
