"""What Lab 2.3 teaches beyond the package: the bytes of a server-sent-events stream, the auth matrix
of a live server, and the client side of the service's production policies.

Everything here is small on purpose: read it next to the notebooks. The service itself lives in the
package (``inference_course.service``); this module only looks at it from the outside.

Notebooks 01-02 (above the marker at the end):

* ``sse_events``: split the raw bytes of an SSE response into events, the way a client must.

Notebooks 03-04 append their helpers below the marker.
"""
from __future__ import annotations


# -- notebooks 03-04 --
