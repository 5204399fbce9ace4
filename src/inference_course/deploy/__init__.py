"""Build and run images, render and validate charts, play manifests (vLLM Lab 2.4, Triton Lab 2.5).

- :mod:`.images`: OCI images built and run for real with podman (a Docker-compatible CLI).
- :mod:`.charts`: the course's Helm chart rendered by the real ``helm``, validated strictly against the
  Kubernetes schemas, policy-checked, and played with ``podman kube play``.
"""
