"""The console entry points: each builds its objects from a config and delegates.

`caption-train` (`train`), `caption-generate` (`generate`), `caption-evaluate` (`evaluate`),
`caption-visualize` (`visualize`), `caption-serve` (`serve`) and `caption-compare`
(`compare`); every one but `caption-compare` is a Hydra command over `conf/<name>.yaml`.
"""
