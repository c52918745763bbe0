"""The downloads: dedup parts -> webdataset shards through img2dataset and the download guard.

parts (names, shard ids, a part folder's state), shards (adding up their stats), download
(a part's download), retry (of failed samples), img2dataset_patches (what reaches into
img2dataset), safe_fetch (the download guard), politeness (a pace per host shared by a
download's workers, connections per host, backoff on 429/503).
"""
