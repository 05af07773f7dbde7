# rota FROM scratch, for deployments/compose/local.yml (no image to pull).
# The build context is bin/compose/rota, laid out by `make compose-images`
# (go run ./deployments/compose/check -images): rootfs/ holds the static
# binary (CGO_ENABLED=0) at /usr/local/bin/rota and an empty /tmp (mode
# 1777). COPY of a directory copies its entries with their modes, which is
# how /tmp gets its sticky bit without a shell to chmod it.
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/bin
# No /etc/passwd: a numeric, non-root user (distroless's nonroot uid).
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/rota"]
CMD ["serve", "--config", "/etc/rota/rota.yaml"]
