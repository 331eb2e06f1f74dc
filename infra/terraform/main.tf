# The batchplan bucket: KMS encryption, versioning, no public access, TLS-only, lifecycle per prefix.
locals {
  bucket_arn = "arn:aws:s3:::${var.bucket_name}"
  # Retention by prefix (paths from batchplan/layout.py): producers' drops expire, history stays.
  expiring_prefixes = {
    queue      = var.queue_expiry_days
    quarantine = var.quarantine_expiry_days
  }
  infrequent_prefixes = ["plans/", "results/", "reports/"]
}

resource "aws_kms_key" "bucket" {
  description             = "batchplan bucket ${var.bucket_name}"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  tags                    = var.tags
}

resource "aws_kms_alias" "bucket" {
  name          = "alias/${var.name}-bucket"
  target_key_id = aws_kms_key.bucket.key_id
}

resource "aws_s3_bucket" "this" {
  bucket = var.bucket_name
  tags   = var.tags
}

resource "aws_s3_bucket_ownership_controls" "this" {
  bucket = aws_s3_bucket.this.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "this" {
  bucket                  = aws_s3_bucket.this.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "this" {
  bucket = aws_s3_bucket.this.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  bucket = aws_s3_bucket.this.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.bucket.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_policy" "tls_only" {
  bucket = aws_s3_bucket.this.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "DenyInsecureTransport"
        Effect    = "Deny"
        Principal = "*"
        Action    = "s3:*"
        Resource  = [local.bucket_arn, "${local.bucket_arn}/*"]
        Condition = { Bool = { "aws:SecureTransport" = "false" } }
      },
      {
        Sid       = "DenyOldTls"
        Effect    = "Deny"
        Principal = "*"
        Action    = "s3:*"
        Resource  = [local.bucket_arn, "${local.bucket_arn}/*"]
        Condition = { NumericLessThan = { "s3:TlsVersion" = "1.2" } }
      },
    ]
  })
  depends_on = [aws_s3_bucket_public_access_block.this]
}

resource "aws_s3_bucket_lifecycle_configuration" "this" {
  bucket = aws_s3_bucket.this.id

  rule {
    id     = "abort-incomplete-uploads-and-old-versions"
    status = "Enabled"
    filter {
      prefix = var.prefix
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiry_days
    }
  }

  dynamic "rule" {
    for_each = local.expiring_prefixes
    content {
      id     = "expire-${rule.key}"
      status = "Enabled"
      filter {
        prefix = "${var.prefix}${rule.key}/"
      }
      expiration {
        days = rule.value
      }
    }
  }

  dynamic "rule" {
    for_each = toset(local.infrequent_prefixes)
    content {
      id     = "infrequent-${trimsuffix(rule.value, "/")}"
      status = "Enabled"
      filter {
        prefix = "${var.prefix}${rule.value}"
      }
      transition {
        days          = 30
        storage_class = "STANDARD_IA"
      }
    }
  }

  depends_on = [aws_s3_bucket_versioning.this]
}
