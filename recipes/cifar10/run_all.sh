#!/bin/sh
# The CIFAR-10 reproduction of the paper's Table 3: the CNN teacher, then the same DeiT
# student with each distillation strategy (none, soft, hard, token), then `deitctl compare`.
# The teacher runs once more, over the students' exact training stream, with `deitctl teach`:
# the soft, hard and token students read its outputs from that cache (teacher-cache/) instead
# of running the teacher on every step, with the same results (docs/teacher-cache.md).
# Run from the repository root:
#   sh recipes/cifar10/run_all.sh
# It first imports CIFAR-10 into data/cifar10/{train,test} with `deitctl data cifar10`
# (downloaded once, MD5-checked; nothing to do when it is there already).
# About an hour on 2 CPU cores at the recipes' size. Arguments go to every `deitctl train`
# (and to `deitctl teach`); TEACHER_ARGS and STUDENT_ARGS (words, no spaces inside one) only
# to the teacher's or the students' (and the teach's) -- README.md gives the full-size
# overrides for a GPU. TEACHER_CACHE= (empty) trains the students with the live teacher.
# A finished run is skipped, an interrupted one continues (--auto-resume); an interrupted
# teach continues where it stopped.
set -eu
set -f  # no globbing: list values such as student.channels=[64,128,256,512] stay as written
deitctl data cifar10 data/cifar10
cache="${TEACHER_CACHE-runs/cifar10/teacher-cache}"
for name in teacher deit_none deit_soft deit_hard deit_token; do
    out="runs/cifar10/$name"
    if [ "$name" = teacher ]; then role_args="${TEACHER_ARGS:-}"; else role_args="${STUDENT_ARGS:-}"; fi
    cache_args=""
    if [ -n "$cache" ] && [ "$name" != teacher ] && [ "$name" != deit_none ]; then
        if [ "$name" = deit_soft ]; then
            # the three distilled students share one stream: teach it once (taught epochs are skipped)
            echo "== teach: the teacher's outputs for the students' training stream -> $cache"
            # shellcheck disable=SC2086
            deitctl teach recipes/cifar10/deit_soft.toml --cache "$cache" $role_args "$@"
        fi
        cache_args="--set teacher.cache=\"$cache\""
    fi
    if [ -f "$out/last.pt" ] && python -c 'import sys; from deitctl.compare import read_run; sys.exit(0 if read_run(sys.argv[1])["complete"] else 1)' "$out"; then
        echo "== $name: finished already ($out)"
        continue
    fi
    echo "== $name"
    # shellcheck disable=SC2086
    deitctl train "recipes/cifar10/$name.toml" --auto-resume $role_args $cache_args "$@"
done
deitctl compare runs/cifar10/teacher runs/cifar10/deit_none runs/cifar10/deit_soft runs/cifar10/deit_hard runs/cifar10/deit_token
