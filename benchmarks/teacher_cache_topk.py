"""The top-k approximation of a teacher-output cache, measured on 1,000-class logits.

Above ``--full-max-classes`` (100 by default) ``deitctl teach`` stores each image's argmax
and its k largest logits (fp16), and one more value: the logit that, given to every class
not stored, gives those classes their true total probability at ``--tail-tau`` (3 by
default, the paper's τ). Training rebuilds the other logits at that value ("fill"), or, with
``--tail-tau 0``, at ``max - 1e4``: the soft target is then the softmax over the top k, as
FKD stores it ("fkd"). Hard targets (the argmax) are exact either way. This script measures
what each does to the soft distillation loss (the paper's eq. 2 term, τ²·KL, at τ = 3 and
τ = 1) and to its gradient with respect to the student's logits, for k = 1 ... 100.

No 1,000-class teacher is at hand here, so the teacher's logits are synthetic, built to look
like a trained ImageNet classifier's on augmented, mixed images: 1,000 classes in 100 groups
of 10 related classes (a dog among dogs); background logits N(0, 1.5²); the group of the
image's class raised by ``group``; its class raised by ``margin``; half the images mixed
(Mixup/CutMix) with a second image, λ ~ U(0.3, 0.7), the two classes' margins weighted by λ
and 1 − λ. Three sharpness settings span confident to uncertain teachers; the printed table
shows each one's mean top-1 probability and the probability mass beyond the top 10 at τ = 3,
which decides the error. The students are logits at initialisation (small noise) and a
half-trained student (the teacher's logits scaled by 0.5, plus noise).

    python benchmarks/teacher_cache_topk.py [--images 4096] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from deitctl.teacher_cache import Layout, decode, encode

CLASSES, GROUP = 1000, 10
SETTINGS = {"confident": (9.0, 3.0), "typical": (6.0, 2.5), "uncertain": (4.0, 2.0)}  # margin, group boost
KS = (1, 5, 10, 20, 50, 100)


def teacher_logits(images: int, margin: float, group: float, g: torch.Generator) -> torch.Tensor:
    z = torch.randn(images, CLASSES, generator=g) * 1.5
    a = torch.randint(0, CLASSES, (images,), generator=g)
    b = torch.randint(0, CLASSES, (images,), generator=g)
    lam = torch.where(torch.rand(images, generator=g) < 0.5, torch.rand(images, generator=g) * 0.4 + 0.3, 1.0)
    rows = torch.arange(images)
    groups = torch.arange(CLASSES) // GROUP
    for cls, weight in ((a, lam), (b, 1 - lam)):
        z += group * weight[:, None] * (groups[None, :] == (cls // GROUP)[:, None])
        z[rows, cls] += margin * weight
    return z


def soft_term(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """τ²·KL(teacher ‖ student) per image, as the soft and token strategies compute it."""
    kl = F.kl_div(F.log_softmax(student / tau, 1), F.log_softmax(teacher / tau, 1), reduction="sum", log_target=True)
    return kl * tau * tau / student.shape[0]


def compare(student: torch.Tensor, full: torch.Tensor, approx: torch.Tensor, tau: float) -> dict[str, float]:
    grads = []
    losses = []
    for teacher in (full, approx):
        s = student.clone().requires_grad_(True)
        loss = soft_term(s, teacher, tau)
        loss.backward()
        assert s.grad is not None
        grads.append(s.grad)
        losses.append(loss.item())
    g_full, g_approx = grads
    return {
        "loss_rel_err": abs(losses[1] - losses[0]) / abs(losses[0]),
        "grad_cosine": F.cosine_similarity(g_full.flatten(), g_approx.flatten(), dim=0).item(),
        "grad_rel_err": ((g_approx - g_full).norm() / g_full.norm()).item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = []
    for setting, (margin, group) in SETTINGS.items():
        teacher = teacher_logits(args.images, margin, group, g)
        p1, p3 = teacher.softmax(1), (teacher / 3).softmax(1)
        stats = {
            "top1_prob": p1.max(1).values.mean().item(),
            "tail_mass_beyond_10_tau3": 1 - p3.topk(10, 1).values.sum(1).mean().item(),
        }
        students = {
            "init": torch.randn(args.images, CLASSES, generator=g) * 0.02,
            "half-trained": teacher * 0.5 + torch.randn(args.images, CLASSES, generator=g),
        }
        for k, (tail, tail_tau) in itertools.product(KS, (("fkd", 0.0), ("fill", 3.0))):
            layout = Layout(CLASSES, "topk", k, tail_tau, "float32", args.images, 1, 1, 1)
            approx = decode(encode(teacher[None], layout), layout)[0]
            assert torch.equal(approx.argmax(1), teacher.argmax(1))  # hard targets: exact
            for name, student in students.items():
                for tau in (3.0, 1.0):
                    rows.append(
                        {"teacher": setting, **stats, "k": k, "tail": tail, "student": name, "tau": tau}
                        | compare(student, teacher, approx, tau)
                    )
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    head = ("teacher", "top1 p", "tail>10", "k", "tail", "student", "tau", "loss err", "grad cos", "grad err")
    print(" ".join(f"{h:>12}" for h in head))
    for r in rows:
        cells = (r["teacher"], f"{r['top1_prob']:.3f}", f"{r['tail_mass_beyond_10_tau3']:.3f}", r["k"], r["tail"])
        cells += (r["student"], r["tau"], f"{r['loss_rel_err']:.4f}", f"{r['grad_cosine']:.4f}")
        cells += (f"{r['grad_rel_err']:.4f}",)
        print(" ".join(f"{c:>12}" for c in cells))


if __name__ == "__main__":
    main()
