"""The data layer: dataset sources -> Examples, caption text, image decoding, buckets, batch sampler.

Flow: iter_source() yields Example/Skipped -> load_image() decodes -> assign_bucket() + fit_to_bucket()
shape each image for PixArt -> BucketBatchSampler groups same-bucket samples into batches.
See data/README.md for the accepted layouts and rules. Nothing here imports a model.
"""

from pixart_tune.data.buckets import (
    assign_bucket,
    bucket_table,
    fit_to_bucket,
    micro_conditions,
)
from pixart_tune.data.captions import caption_processing_id, process_caption
from pixart_tune.data.examples import Example, Skipped
from pixart_tune.data.images import BadImage, load_image
from pixart_tune.data.sampler import BucketBatchSampler
from pixart_tune.data.sources import DataError, detect_source, iter_source

__all__ = [
    "BadImage",
    "BucketBatchSampler",
    "DataError",
    "Example",
    "Skipped",
    "assign_bucket",
    "bucket_table",
    "caption_processing_id",
    "detect_source",
    "fit_to_bucket",
    "iter_source",
    "load_image",
    "micro_conditions",
    "process_caption",
]
