output "namespace" {
  description = "Namespace of the RayService and its Secrets."
  value       = kubernetes_namespace.expertmesh.metadata[0].name
}

output "api_key" {
  description = "Bearer token of the expertmesh OpenAI-compatible API (also in Secret expertmesh/expertmesh-api-key)."
  value       = random_password.api_key.result
  sensitive   = true
}
