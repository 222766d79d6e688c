"""The receiver's HTTP API (FastAPI): uploads, status, reconstructions, listing, deletion, health and
metrics, plus the gallery (`aeic.receiver.gallery`, which builds on the names re-exported here).

One concept per module, in the order a request meets them:

* `app` - the app factory: storage and components wired into a `ReceiverState`, routes, gallery, lifecycle
* `lifecycle` - start-up (locks, migration, sweeps, the embedded worker) and shutdown
* `routes` - the route table, with every status each route answers (the OpenAPI document)
* `state` - `ReceiverState`, the wiring a handler reaches through its request
* `auth` - who is asking: bearer token or gallery session, and the wrong-token limit
* `uploads` - `POST /v1/images`: validate, store durably, queue
* `images` - one image's status, the listing (with its change-token `ETag`), deletion
* `downloads` - reconstruction and thumbnail files, streamed, with their validators
* `conversions` - JPEG/WebP made from the PNG once, under a budget, and kept
* `conditional` - `If-None-Match` against those validators
* `shapes` - the JSON of an image
* `health` - liveness, readiness, metrics
"""

from aeic.receiver.api.app import build_state, create_app
from aeic.receiver.api.auth import client_address, optional_principal, principal
from aeic.receiver.api.conversions import ConversionBudget
from aeic.receiver.api.downloads import BlobDownload
from aeic.receiver.api.images import visible_image
from aeic.receiver.api.shapes import image_json
from aeic.receiver.api.state import ReceiverState, receiver_state
from aeic.receiver.api.uploads import read_body

__all__ = [
    "BlobDownload",
    "ConversionBudget",
    "ReceiverState",
    "build_state",
    "client_address",
    "create_app",
    "image_json",
    "optional_principal",
    "principal",
    "read_body",
    "receiver_state",
    "visible_image",
]
