"""Images and datasets: safe decoding, crop/resize, webdataset shards and manifests."""
