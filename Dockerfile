# syntax=docker/dockerfile:1
# rota: a static binary on a distroless, non-root base. docker-compose.yml
# runs it as the proxy and as both kinds of demo backends (etcd- and
# Consul-registered). Offline, deployments/compose/scratch/rota.Dockerfile
# builds the same binary into a FROM-scratch image instead.
#   docker build -t rota .
#   docker run --rm -p 8080:8080 -p 127.0.0.1:9090:9090 -v "$PWD/admin-token:/run/secrets/rota-admin:ro" rota \
#     serve --listen :8080 --backend host.docker.internal:9000 --admin 0.0.0.0:9090 --admin-token-file /run/secrets/rota-admin
#   (a non-loopback admin address needs a token: a file with one line, e.g. head -c 32 /dev/urandom | base64)
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=docker
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/rota ./cmd/rota

# The default image. distroless/static: no shell, no package manager, uid 65532.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/rota /usr/local/bin/rota
USER nonroot:nonroot
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/rota"]
CMD ["serve", "--config", "/etc/rota/rota.yaml"]
