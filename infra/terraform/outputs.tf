output "bucket_name" {
  value = aws_s3_bucket.this.bucket
}

output "worker_role_arn" {
  description = "Put this in infra/helm/values.yaml (eks.amazonaws.com/role-arn annotations)."
  value       = aws_iam_role.workers.arn
}

output "kms_key_arn" {
  value = aws_kms_key.bucket.arn
}
