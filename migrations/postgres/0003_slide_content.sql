-- Content identity of each slide's file (size, mtime and a hash of its first and last MiB, as
-- JSON): ingest refuses a different file under a known id unless told to replace it.
ALTER TABLE slides ADD COLUMN content TEXT;
