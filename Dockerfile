# laneswitch: the proxy (data plane on 8080) and its admin API (9901) in one small image.
#
#   docker build -t laneswitch .
#   docker run --rm -p 8080:8080 -p 9901:9901 \
#     -e LANESWITCH_ADMIN_TOKEN="$(openssl rand -hex 32)" \
#     -v "$PWD/laneswitch.yaml:/etc/laneswitch/laneswitch.yaml:ro" laneswitch
#
# The config is not baked in: mount yours at /etc/laneswitch/laneswitch.yaml (in Kubernetes a
# ConfigMap, see deploy/kubernetes/). In a container it must listen beyond loopback, e.g.
# `listen: 0.0.0.0:8080` and `admin: {listen: "0.0.0.0:9901", token: ${LANESWITCH_ADMIN_TOKEN}}`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed, non-root uid/gid, so that Kubernetes' runAsNonRoot can check it and volumes can be
# given to it (fsGroup).
RUN groupadd --system --gid 10001 laneswitch \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/laneswitch \
      --shell /usr/sbin/nologin laneswitch \
 && mkdir -p /etc/laneswitch /var/lib/laneswitch \
 && chown laneswitch:laneswitch /var/lib/laneswitch

# Only what the package build needs (see .dockerignore); the source is removed after the install.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install . && rm -rf /src

# The working directory is writable by the proxy: a relative `state_file` lands here.
WORKDIR /var/lib/laneswitch
USER 10001:10001

EXPOSE 8080 9901

# slim has no curl: ask the admin API with the standard library. LANESWITCH_ADMIN_PORT only
# needs setting when the config's admin.listen is not on port 9901.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LANESWITCH_ADMIN_PORT', '9901'), timeout=2)"]

ENTRYPOINT ["laneswitch"]
CMD ["run", "-c", "/etc/laneswitch/laneswitch.yaml"]
