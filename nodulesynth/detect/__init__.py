"""Detection benchmark support: window cutting (no ultralytics) and YOLO training/evaluation
(``detect.yolo``, the only module that imports the optional AGPL-3.0 ultralytics extra)."""
