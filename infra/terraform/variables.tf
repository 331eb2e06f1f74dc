variable "bucket_name" {
  description = "The batchplan bucket (queue/, quarantine/, plans/, results/, reports/, models/, outcomes/)."
  type        = string
}

variable "prefix" {
  description = "Key prefix inside the bucket for every batchplan path (BATCHPLAN_PREFIX); empty or ending in '/'."
  type        = string
  default     = ""
  validation {
    condition     = var.prefix == "" || endswith(var.prefix, "/")
    error_message = "prefix must be empty or end with '/'."
  }
}

variable "name" {
  description = "Name stem for the IAM role, the policy and the KMS alias."
  type        = string
  default     = "batchplan"
}

variable "oidc_provider_arn" {
  description = "ARN of the cluster's IAM OIDC provider (EKS: aws_iam_openid_connect_provider)."
  type        = string
}

variable "oidc_provider_url" {
  description = "Issuer of that provider without https:// (e.g. oidc.eks.eu-west-1.amazonaws.com/id/ABC123)."
  type        = string
}

variable "namespace" {
  description = "Kubernetes namespace of the Airflow release."
  type        = string
  default     = "batchplan"
}

variable "service_accounts" {
  description = "Service accounts allowed to assume the worker role (match infra/helm/values.yaml)."
  type        = list(string)
  default     = ["batchplan-worker", "batchplan-triggerer", "batchplan-api-server"]
}

variable "queue_expiry_days" {
  description = "Days a consumed queue part is kept before expiry."
  type        = number
  default     = 30
}

variable "quarantine_expiry_days" {
  type    = number
  default = 90
}

variable "noncurrent_version_expiry_days" {
  description = "Days an overwritten or deleted object version is kept (versioning is on)."
  type        = number
  default     = 30
}

variable "tags" {
  type    = map(string)
  default = { project = "batchplan" }
}
