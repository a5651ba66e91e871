#!/usr/bin/env bash
# The image's build stage without a Docker engine: goes through the Dockerfile's build stage in
# order, copying what each COPY names into an empty directory and running each RUN there, so a
# source the Dockerfile forgets to copy fails here as it would in `docker build`. In order,
# because the stage builds the dependencies from stub sources first and removes the stubs
# before the real sources are copied. (The toolchain is this machine's, not the Rust image's.)
set -euo pipefail
cd "$(dirname "$0")/.."
# DOCKERFILE: another Dockerfile to try (to see that a missing COPY fails here).
DOCKERFILE=${DOCKERFILE:-Dockerfile}
stage=$(mktemp -d /tmp/image-build-stage.XXXXXX)
trap 'rm -rf "$stage"' EXIT

# What .dockerignore keeps out of the build context: a COPY of it fails in `docker build`, so
# it fails here too (simple patterns: a path, a glob, **/ in front; no ! exceptions).
mapfile -t ignored < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' -e 's|^/||' -e 's|^\*\*/||' .dockerignore 2>/dev/null)
excluded() {
    local p
    for p in "${ignored[@]}"; do
        # Unquoted on the right: a glob.
        # shellcheck disable=SC2053
        if [[ $1 == $p || $1 == $p/* ]]; then
            return 0
        fi
    done
    return 1
}

in_build=0
ran=0
# The Dockerfile with its continuation lines joined.
while IFS= read -r line; do
    case $line in
        FROM*" AS build"*) in_build=1; continue ;;
        FROM*) in_build=0 ;;
    esac
    ((in_build)) || continue
    if [[ $line =~ ^COPY[[:space:]] ]]; then
        read -ra args <<<"${line#COPY }"
        dest=${args[-1]}
        for src in "${args[@]:0:${#args[@]}-1}"; do
            src=${src#./}
            if excluded "$src"; then
                echo "image build stage: COPY $src, which .dockerignore keeps out of the context" >&2
                exit 1
            fi
            if [[ $dest == */ ]]; then
                mkdir -p "$stage/$dest"
                cp -r "$src" "$stage/$dest"
            else
                mkdir -p "$(dirname "$stage/$dest")"
                rm -rf "${stage:?}/$dest"
                cp -r "$src" "$stage/$dest"
            fi
        done
    elif [[ $line =~ ^RUN[[:space:]] ]]; then
        cmd=${line#RUN }
        echo "image build stage: $cmd" >&2
        (cd "$stage" && CARGO_TARGET_DIR="$stage/target" bash -c "$cmd")
        ran=$((ran + 1))
    elif [[ $line =~ ^(ENV|ARG|ADD|SHELL)[[:space:]] ]]; then
        # Not replayed here: the stage must keep to COPY, RUN and WORKDIR (see the Dockerfile).
        echo "image build stage: ${line%% *} is not replayed by $0; keep the build stage to COPY and RUN" >&2
        exit 1
    fi
done < <(sed -e ':a' -e '/\\$/N; s/\\\n//; ta' "$DOCKERFILE")

if ((ran == 0)); then
    echo "image build stage: no RUN line found in the stage named 'build' of $DOCKERFILE" >&2
    exit 1
fi
test -x "$stage/target/release/kbs-affinity-proxy"
"$stage/target/release/kbs-affinity-proxy" --version
