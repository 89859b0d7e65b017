//! Model math for gigapath, in candle: the Prov-GigaPath tile encoder (timm ViT), the LongNet slide
//! encoder with dilated attention, and BERT-family text encoders.
//!
//! This crate knows nothing of slides, HTTP or databases: tensors in, tensors out.
