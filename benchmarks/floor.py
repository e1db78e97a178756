"""The floor of a steady-state run: ``python -m benchmarks.floor KUBECONFIG PAGE_SIZE``.

A fresh process that imports the same ``kubernetes`` client the reconciler uses and lists the same Applications
with the same page size, the way a script using that client would (``CustomObjectsApi``, the client decoding each
page), and does nothing else. Prints how many Applications it listed.
"""

from __future__ import annotations

import sys
from typing import Any

from kubernetes import client, config


def main(argv: list[str]) -> int:
    kubeconfig, page_size = argv[0], int(argv[1])
    configuration = client.Configuration()
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=kubeconfig, client_configuration=configuration, persist_config=False
    )
    api = client.CustomObjectsApi(client.ApiClient(configuration))
    listed = 0
    token: str | None = None
    while True:
        extra: dict[str, Any] = {"_continue": token} if token else {}
        page: Any = api.list_cluster_custom_object("argoproj.io", "v1alpha1", "applications", limit=page_size, **extra)
        listed += len(page["items"])
        token = page["metadata"].get("continue")
        if not token:
            break
    print(listed)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
