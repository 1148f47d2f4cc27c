#!/bin/sh
# The CIFAR-10 reproduction of the paper's Table 3: the CNN teacher, then the same DeiT
# student with each distillation strategy (none, soft, hard, token), then `deitctl compare`.
# Run from the repository root:
#   sh recipes/cifar10/run_all.sh
# It first imports CIFAR-10 into data/cifar10/{train,test} with `deitctl data cifar10`
# (downloaded once, MD5-checked; nothing to do when it is there already).
# About an hour on 2 CPU cores at the recipes' size. Arguments go to every `deitctl train`;
# TEACHER_ARGS and STUDENT_ARGS (words, no spaces inside one) only to the teacher's or the
# students' -- README.md gives the full-size overrides for a GPU. A finished run is skipped,
# an interrupted one continues with --resume.
set -eu
set -f  # no globbing: list values such as student.channels=[64,128,256,512] stay as written
deitctl data cifar10 data/cifar10
for name in teacher deit_none deit_soft deit_hard deit_token; do
    out="runs/cifar10/$name"
    if [ "$name" = teacher ]; then role_args="${TEACHER_ARGS:-}"; else role_args="${STUDENT_ARGS:-}"; fi
    if [ -f "$out/last.pt" ]; then
        if python -c 'import sys; from deitctl.compare import read_run; sys.exit(0 if read_run(sys.argv[1])["complete"] else 1)' "$out"; then
            echo "== $name: finished already ($out)"
            continue
        fi
        echo "== $name: continuing ($out)"
        # shellcheck disable=SC2086
        deitctl train "recipes/cifar10/$name.toml" --resume $role_args "$@"
    else
        echo "== $name"
        # shellcheck disable=SC2086
        deitctl train "recipes/cifar10/$name.toml" $role_args "$@"
    fi
done
deitctl compare runs/cifar10/teacher runs/cifar10/deit_none runs/cifar10/deit_soft runs/cifar10/deit_hard runs/cifar10/deit_token
