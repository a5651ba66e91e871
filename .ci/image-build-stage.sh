#!/usr/bin/env bash
# The image's build stage without a Docker engine: copies exactly what the Dockerfile's build
# stage COPYs into an empty directory and runs its RUN lines there, so a source the Dockerfile
# forgets to copy fails here as it would in `docker build`. (The toolchain is this machine's,
# not the rust:1-bookworm image's.)
set -euo pipefail
cd "$(dirname "$0")/.."
# DOCKERFILE: another Dockerfile to try (to see that a missing COPY fails here).
DOCKERFILE=${DOCKERFILE:-Dockerfile}
stage=$(mktemp -d /tmp/image-build-stage.XXXXXX)
trap 'rm -rf "$stage"' EXIT

in_build=0
while IFS= read -r line; do
    case $line in
        FROM*" AS build"*) in_build=1 ;;
        FROM*) in_build=0 ;;
    esac
    ((in_build)) || continue
    if [[ $line =~ ^COPY[[:space:]] ]]; then
        read -ra args <<<"${line#COPY }"
        dest=${args[-1]}
        for src in "${args[@]:0:${#args[@]}-1}"; do
            mkdir -p "$stage/$dest"
            if [[ $dest == */ ]]; then
                cp -r "$src" "$stage/$dest"
            else
                rm -rf "${stage:?}/$dest"
                cp -r "$src" "$stage/$dest"
            fi
        done
    fi
done < <(sed -e ':a' -e '/\\$/N; s/\\\n//; ta' "$DOCKERFILE")

# The RUN lines of the build stage, joined across their continuation lines.
sed -e ':a' -e '/\\$/N; s/\\\n//; ta' "$DOCKERFILE" |
    awk '/^FROM .* AS build/ { b = 1; next } /^FROM / { b = 0 } b && /^RUN / { sub(/^RUN /, ""); print }' |
    while IFS= read -r cmd; do
        echo "image build stage: $cmd" >&2
        (cd "$stage" && CARGO_TARGET_DIR="$stage/target" bash -c "$cmd")
    done
test -x "$stage/target/release/kbs-affinity-proxy"
"$stage/target/release/kbs-affinity-proxy" --version
