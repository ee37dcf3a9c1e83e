#!/bin/bash
# Cases a and b, the code before the refactor and after it, back to back, twice (ABAB).
set -u
cd /work/main
for round in 1 2; do
  for side in before after; do
    echo "== round $round: $side ($(date +%T))"
    scripts/bench-transfer --cases a,b --tools cf-stream --runs 3 --warmups 1 --no-resume-check \
      --coldferry /work/$side/cf --out /tmp/bench-$side-$round 2>&1 | tail -25
  done
done
echo "== done $(date +%T)"
