# The proxy's image: built with the Rust toolchain, run on a distroless base as non-root.
#
#   docker build -t kbs-affinity-proxy .
#   docker buildx build --platform linux/amd64,linux/arm64 .   (what .github/workflows/release.yaml does)
#
# Base images are pinned by digest, so a rebuild starts from the bytes that were reviewed. To
# move to a newer base: `docker buildx imagetools inspect rust:1.95-slim-bookworm` (and the
# distroless tag), then replace the digest after the tag; keep the tag, it says what the digest is.
# Both digests must be those of the multi-platform index (what imagetools prints first as
# "Digest:"), not of one platform's manifest, or the arm64 build gets the amd64 image.
#
# .ci/image-build-stage.sh runs this build stage without a Docker engine: the files its COPY
# lines name, in an empty directory, built by its RUN lines. Keep the stage to COPY, RUN and
# WORKDIR so that script stays exact.
FROM rust:1.95-slim-bookworm@sha256:caaf9ca7acd474892186860307d6f28e51fdbc1a4eada459fcff81517cf46a36 AS build
WORKDIR /src

# The dependency layer: the workspace's manifests with empty sources, so that the ~220 crates
# the proxy depends on are compiled once and cached until Cargo.toml or Cargo.lock changes. The
# root manifest declares its benches by path, so they get stubs too. The stubs and what was
# built from them are removed before the real sources come in: a source the COPY lines below
# forget then fails the build instead of leaving a stub in the binary.
COPY Cargo.toml Cargo.lock ./
COPY crates/runtime/Cargo.toml crates/runtime/
COPY crates/proxy/Cargo.toml crates/proxy/
COPY crates/harness/Cargo.toml crates/harness/
RUN mkdir -p src benches crates/runtime/src crates/proxy/src crates/harness/src \
 && echo 'fn main() {}' > src/main.rs \
 && for b in hot_path tls_handshake; do echo 'fn main() {}' > "benches/$b.rs"; done \
 && for c in runtime proxy harness; do touch "crates/$c/src/lib.rs"; done \
 && cargo build --release --locked --bin kbs-affinity-proxy \
 && cargo clean --release --locked -p kbs-affinity-proxy -p kbs-proxy -p kbs-proxy-runtime -p kbs-proxy-harness \
 && rm -rf src benches crates/runtime/src crates/proxy/src crates/harness/src

# The sources: the binary, the workspace's crates, and the benches the root manifest names.
# tests/, examples/ and fuzz/ are not part of the binary (fuzz/ is a workspace of its own).
COPY src ./src
COPY crates ./crates
COPY benches ./benches
RUN cargo build --release --locked --bin kbs-affinity-proxy \
 && strip target/release/kbs-affinity-proxy

# glibc and libgcc only: no shell, no package manager, no curl. The :nonroot variant's user is
# 65532, set again below so that a runtime that checks runAsNonRoot sees a numeric user.
FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f
COPY --from=build /src/target/release/kbs-affinity-proxy /usr/local/bin/kbs-affinity-proxy
USER 65532:65532
# 8080: clients. 9090: the admin port (/healthz, /readyz, /metrics, /backends), which is off
# unless --admin-listen (or admin-listen in the config file) turns it on; the manifests in
# deploy/kubernetes turn it on at 0.0.0.0:9090.
EXPOSE 8080 9090
# Docker and Podman run this; Kubernetes ignores it and uses the pods' probes. Distroless has no
# shell or curl: the binary's own `healthcheck` subcommand GETs the URL and exits 0 on a 2xx
# within 2 s. It needs the admin port on 9090 (as deploy/kubernetes/configmap.yaml has it; for
# `docker run`, pass --admin-listen 127.0.0.1:9090 or 0.0.0.0:9090). Without an admin port this
# check fails and Docker marks the container unhealthy, which is the honest answer: nothing
# else in the image can tell whether the proxy is alive.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/kbs-affinity-proxy", "healthcheck", "--url", "http://127.0.0.1:9090/healthz"]
ENTRYPOINT ["/usr/local/bin/kbs-affinity-proxy"]
