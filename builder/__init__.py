"""From raw sources to a Hub-ready AffectNet+ folder: readers, image cropping, the sample, export."""
