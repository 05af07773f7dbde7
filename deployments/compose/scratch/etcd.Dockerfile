# etcd FROM scratch, for deployments/compose/local.yml and cluster.yml (no
# image to pull). The build context is bin/compose/etcd, laid out by
# `make compose-images`: rootfs/ holds the static etcd and etcdctl built by
# scripts/etcd-bin at /usr/local/bin (where the official image has them;
# the healthcheck runs etcdctl) and an empty /tmp (mode 1777); owned/ holds
# /etcd-data (mode 0700, as etcd wants its data dir), owned by the user
# below, so that a named volume mounted there starts with that owner.
FROM scratch
COPY rootfs/ /
COPY --chown=65532:65532 owned/ /
ENV PATH=/usr/local/bin
USER 65532:65532
EXPOSE 2379 2380
CMD ["/usr/local/bin/etcd"]
