# Shared by bench.sh and bench-nbd.sh (sourced): medians and ratios over the rounds of a run.
# The caller keeps every figure in the associative array R, keyed "side.figure.round", and
# sets ROUNDS.

# stdin: one number per line -> their median ("n/a" for none).
median() {
    sort -g | awk '{ v[NR] = $1 }
        END { if (NR == 0) print "n/a"; else if (NR % 2) print v[(NR + 1) / 2];
              else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# base figure -> figure / base, or "n/a" when base is not positive.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0) printf "%.3f", b / a; else print "n/a" }'; }

# side key -> that figure of each round, one per line.
figures() {
    local r
    for r in $(seq "$ROUNDS"); do echo "${R[$1.$2.$r]}"; done
}

# base side key -> "median min-max" of the rounds' ratios of side to base.
ratios() {
    local r
    for r in $(seq "$ROUNDS"); do
        ratio "${R[$1.$3.$r]}" "${R[$2.$3.$r]}"
        echo
    done | grep -v n/a | sort -g | awk '{ v[NR] = $1 }
        END { if (NR == 0) { print "n/a -"; exit }
              m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
              printf "%.3f %.2f-%.2f\n", m, v[1], v[NR] }'
}
