# The workers' role: assumed by the Airflow pods' Kubernetes service accounts through the cluster's
# OIDC provider (IRSA, sts:AssumeRoleWithWebIdentity). No IAM user, no access keys.
resource "aws_iam_role" "workers" {
  name = "${var.name}-workers"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Federated = var.oidc_provider_arn }
      Action    = "sts:AssumeRoleWithWebIdentity"
      Condition = {
        StringEquals = {
          "${var.oidc_provider_url}:aud" = "sts.amazonaws.com"
          "${var.oidc_provider_url}:sub" = [for sa in var.service_accounts : "system:serviceaccount:${var.namespace}:${sa}"]
        }
      }
    }]
  })
  max_session_duration = 3600
  tags                 = var.tags
}

resource "aws_iam_policy" "workers" {
  name        = "${var.name}-workers-s3"
  description = "Read/write the batchplan prefix of ${var.bucket_name}; use its KMS key."
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid      = "ListPrefix"
        Effect   = "Allow"
        Action   = ["s3:ListBucket"]
        Resource = [local.bucket_arn]
        Condition = {
          StringLike = { "s3:prefix" = ["${var.prefix}*"] }
        }
      },
      {
        Sid      = "ObjectsUnderPrefix"
        Effect   = "Allow"
        Action   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
        Resource = ["${local.bucket_arn}/${var.prefix}*"]
      },
      {
        Sid      = "BucketKey"
        Effect   = "Allow"
        Action   = ["kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey"]
        Resource = [aws_kms_key.bucket.arn]
      },
    ]
  })
  tags = var.tags
}

resource "aws_iam_role_policy_attachment" "workers" {
  role       = aws_iam_role.workers.name
  policy_arn = aws_iam_policy.workers.arn
}
