# The one bitsfarm image: the operator (`bitsfarm operator`, run by charts/bitsfarm-operator) and,
# by default, the upload servers of every farm (`bitsfarm serve`), so both always speak the same
# protocol version. Build: docker build -t bitsfarm:0.1.0 .
#
# Stage 1: the release build of the same package and binary the tests run (Cargo.lock as is).
# Cargo reads every target Cargo.toml names before it builds any, so the bench's source comes too.
# The RUN command writes only below the WORKDIR (target/, out/), so tests/cluster/image.py runs the
# very same command in a folder of its own (`image.py build-stage`; tests/dockerfile.rs checks that
# this stage builds from exactly what it copies).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin bitsfarm \
 && install -D -m 0755 target/release/bitsfarm out/usr/local/bin/bitsfarm

# Stage 2: distroless with glibc (the binary links it dynamically) and CA certificates; no shell,
# no package manager. The binary is on PATH as `bitsfarm`, which the chart and the farm pods run.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/out/usr/local/bin/bitsfarm /usr/local/bin/bitsfarm
# 65532 is distroless' nonroot user: the chart's runAsUser and the farm pods' uid and fsGroup.
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/bitsfarm"]
CMD ["--help"]
