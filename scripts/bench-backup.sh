#!/usr/bin/env bash
# A large backup in bounded memory: loads SIZE_MIB (default 1024) MiB of 64 KiB values into a local 3-node
# playground, then runs `kiwi snapshot save --consistent` and `kiwi snapshot status` on the result, and
# reports the file size, the time, the CLI's peak RSS (GNU time) and the streaming node's RSS before the
# save and at its peak during it (sampled every 100 ms), which should stay flat: the node holds about two
# chunks of ~1 MiB in flight, the CLI one. Logs and the backup file stay in WORK_DIR.
#
# Environment: SIZE_MIB (default 1024), WORK_DIR (default a fresh directory under /var/tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

SIZE_MIB=${SIZE_MIB:-1024}
VALUE=65536
KEYS=$((SIZE_MIB * 16))
build_kiwi
init_work_dir kiwi-backup
trap stop_playground EXIT
start_playground kiwi 17691
echo "loading $KEYS keys of $VALUE bytes ($SIZE_MIB MiB) ..." >&2
"$KIWI" bench --workload get --workers 32 --keys "$KEYS" --value-size "$VALUE" --duration 1s --quiet >/dev/null

leader=$("$KIWI" status --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["leader"])')
pid=$(pgrep -f "kiwi-node --config $WORK_DIR/kiwi/node-$leader/")
rss() { awk '/VmRSS/ {print int($2 / 1024)}' "/proc/$pid/status"; }
before=$(rss)
peak=$before
file=$WORK_DIR/backup.kiwi
echo "saving from node $leader (RSS $before MiB) ..." >&2
start=$(date +%s.%N)
/usr/bin/env time -f "%M" -o "$WORK_DIR/cli-maxrss" "$KIWI" --endpoints "$(echo "$KIWI_ENDPOINTS" | cut -d, -f"$leader")" \
    snapshot save "$file" --consistent >"$WORK_DIR/save.out" &
save=$!
while kill -0 "$save" 2>/dev/null; do
    r=$(rss)
    [ "$r" -gt "$peak" ] && peak=$r
    sleep 0.1
done
wait "$save"
took=$(python3 -c "import time; print(round(time.time() - $start, 1))")
after=$(rss)
cat "$WORK_DIR/save.out"
"$KIWI" snapshot status "$file" >"$WORK_DIR/status.out"
bytes=$(stat -c %s "$file")
echo
echo "backup of $SIZE_MIB MiB of values: $((bytes / 1048576)) MiB file in ${took} s; checked: $(grep -c 'checksum:    ok' "$WORK_DIR/status.out") (kiwi snapshot status)"
echo "kiwi CLI peak RSS: $(( $(cat "$WORK_DIR/cli-maxrss") / 1024 )) MiB"
echo "streaming node RSS: $before MiB before, $peak MiB at its peak during the save, $after MiB after"
