"""Caption metrics: corpus BLEU (nltk), the COCO toolkit's METEOR, ROUGE-L and CIDEr-D
(`coco_metrics`, Java), and a pure-Python CIDEr-D equal to the toolkit's (`cider_d`, `CiderD`)
that is fast enough to be the SCST reward; and the rate of captions that repeat a trigram."""

from caption.metrics.cider import CiderD, cider_d
from caption.metrics.coco import bleu, coco_metrics
from caption.metrics.repetition import repeated_trigram_rate

__all__ = ["CiderD", "bleu", "cider_d", "coco_metrics", "repeated_trigram_rate"]
