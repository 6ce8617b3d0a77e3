#!/bin/bash
# usage: linecounts.sh COMMIT  -> lines of .py per package at that commit
c=$1; cd "${REPO:-/work/main}"
count() { git ls-tree -r --name-only $c -- "$1" | grep '\.py$' | grep -v "$2" | while read f; do git show $c:$f | wc -l; done | awk '{s+=$1} END {print s+0}'; }
printf "ld_jax (top-level modules) %s\n" $(git ls-tree --name-only $c ld_jax/ | grep '\.py$' | while read f; do git show $c:$f | wc -l; done | awk '{s+=$1} END {print s}')
for p in models data train flow experiments; do printf "ld_jax/%s %s\n" $p $(count ld_jax/$p/ NONE); done
printf "ld_jax total %s\n" $(count ld_jax/ NONE)
printf "tests %s\nbenchmarks %s\n" $(count tests/ NONE) $(count benchmarks/ NONE)
