output "namespace" {
  description = "Namespace of the RayService and its Secrets."
  value       = kubernetes_namespace.expertmesh.metadata[0].name
}

output "api_key" {
  description = "Bearer token of the expertmesh OpenAI-compatible API (also in Secret expertmesh/expertmesh-api-key)."
  value       = random_password.api_key.result
  sensitive   = true
}

output "ray_auth_token" {
  description = "Token of Ray's token auth on the expertmesh Ray clusters (also in Secret expertmesh/expertmesh-ray-auth, key auth_token): RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<it> for `ray job` or the dashboard."
  value       = random_password.ray_auth_token.result
  sensitive   = true
}
