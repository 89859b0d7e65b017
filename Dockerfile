# gigapath: the `gigapath` binary with the system OpenSlide, for the API and worker services of
# docker-compose.yml. CPU build by default; for GPU workers build with
#   docker build --build-arg FEATURES=cuda --build-arg BASE=nvidia/cuda:13.0.0-runtime-ubuntu24.04 .
# (the CUDA toolkit must be in the builder for that; see README "GPU").
ARG BASE=debian:bookworm-slim

FROM rust:1.95-bookworm AS build
ARG FEATURES=""
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends libopenslide-dev libclang-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release -p gigapath ${FEATURES:+--features $FEATURES} \
    && strip target/release/gigapath

FROM ${BASE}
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends libopenslide0 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/gigapath /usr/local/bin/gigapath
COPY prompts /opt/gigapath/prompts
ENV GIGAPATH_DATA_DIR=/data
WORKDIR /opt/gigapath
ENTRYPOINT ["gigapath"]
