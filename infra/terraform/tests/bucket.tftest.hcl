# `terraform test` with a mocked AWS provider: plans and applies the module against no account, and
# asserts the security properties the bucket must keep.
mock_provider "aws" {
  mock_resource "aws_iam_policy" {
    defaults = { arn = "arn:aws:iam::123456789012:policy/batchplan-workers-s3" }
  }
  mock_resource "aws_iam_role" {
    defaults = { arn = "arn:aws:iam::123456789012:role/batchplan-workers" }
  }
  mock_resource "aws_kms_key" {
    defaults = { arn = "arn:aws:kms:eu-west-1:123456789012:key/00000000-0000-0000-0000-000000000000" }
  }
}

variables {
  bucket_name       = "batchplan-test"
  prefix            = "bp/"
  oidc_provider_arn = "arn:aws:iam::123456789012:oidc-provider/oidc.eks.eu-west-1.amazonaws.com/id/TEST"
  oidc_provider_url = "oidc.eks.eu-west-1.amazonaws.com/id/TEST"
}

run "bucket_is_encrypted_versioned_private_and_tls_only" {
  command = apply

  assert {
    condition     = one(one(aws_s3_bucket_server_side_encryption_configuration.this.rule).apply_server_side_encryption_by_default).sse_algorithm == "aws:kms"
    error_message = "default encryption must be SSE-KMS"
  }
  assert {
    condition     = aws_kms_key.bucket.enable_key_rotation
    error_message = "the bucket key must rotate"
  }
  assert {
    condition     = one(aws_s3_bucket_versioning.this.versioning_configuration).status == "Enabled"
    error_message = "versioning must be enabled"
  }
  assert {
    condition = alltrue([
      aws_s3_bucket_public_access_block.this.block_public_acls,
      aws_s3_bucket_public_access_block.this.block_public_policy,
      aws_s3_bucket_public_access_block.this.ignore_public_acls,
      aws_s3_bucket_public_access_block.this.restrict_public_buckets,
    ])
    error_message = "all public access must be blocked"
  }
  assert {
    condition = anytrue([
      for s in jsondecode(aws_s3_bucket_policy.tls_only.policy).Statement :
      s.Effect == "Deny" && try(s.Condition.Bool["aws:SecureTransport"], "") == "false"
    ])
    error_message = "the bucket policy must deny requests without TLS"
  }
}

run "lifecycle_expires_drops_and_old_versions" {
  command = apply

  assert {
    condition = contains(
      [for r in aws_s3_bucket_lifecycle_configuration.this.rule : one(r.filter).prefix if length(r.expiration) > 0],
      "bp/queue/"
    )
    error_message = "queue/ parts must expire"
  }
  assert {
    condition = anytrue([
      for r in aws_s3_bucket_lifecycle_configuration.this.rule : length(r.noncurrent_version_expiration) > 0
    ])
    error_message = "non-current versions must expire"
  }
  assert {
    condition = anytrue([
      for r in aws_s3_bucket_lifecycle_configuration.this.rule : length(r.abort_incomplete_multipart_upload) > 0
    ])
    error_message = "incomplete multipart uploads must be aborted"
  }
}

run "worker_role_is_web_identity_only" {
  command = apply

  assert {
    condition     = jsondecode(aws_iam_role.workers.assume_role_policy).Statement[0].Action == "sts:AssumeRoleWithWebIdentity"
    error_message = "the worker role must be assumed through the cluster OIDC provider"
  }
  assert {
    condition = contains(
      jsondecode(aws_iam_role.workers.assume_role_policy).Statement[0].Condition.StringEquals["oidc.eks.eu-west-1.amazonaws.com/id/TEST:sub"],
      "system:serviceaccount:batchplan:batchplan-worker"
    )
    error_message = "the worker service account must be allowed"
  }
  assert {
    condition     = alltrue([for s in jsondecode(aws_iam_policy.workers.policy).Statement : s.Effect == "Allow" && !contains(flatten([s.Action]), "s3:*")])
    error_message = "the worker policy must not grant s3:*"
  }
}
