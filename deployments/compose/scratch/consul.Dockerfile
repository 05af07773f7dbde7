# Consul FROM scratch, for deployments/compose/local.yml and cluster.yml (no
# image to pull). The build context is bin/compose/consul, laid out by
# `make compose-images`: rootfs/ holds the static consul built by
# scripts/consul-bin at /bin/consul (where the official image has it) and an
# empty /tmp (mode 1777); owned/ holds /consul/data (mode 0700), the data
# dir of cluster.yml's servers, owned by the user below.
FROM scratch
COPY rootfs/ /
COPY --chown=65532:65532 owned/ /
ENV PATH=/bin
USER 65532:65532
EXPOSE 8500 8300 8301 8302
# The official image's entrypoint runs `consul <command>`; so does this one,
# so docker-compose.yml's command (agent -dev ...) means the same in both.
ENTRYPOINT ["/bin/consul"]
CMD ["agent", "-dev", "-client", "0.0.0.0"]
