// 002 build notes, 理论 (theory): PERSIA's FeatureBatch::new. Fixes: none. Skipped: Rust code of PERSIA's crate persia-embedding-server (not a standalone program).
  impl FeatureBatch {
      pub fn new(feature_name: String, batch: Vec<Vec<u64>>) -> Self {
          let batch_size = batch.len(); // 矩阵行数，也是一个batch有几个sample
          let mut sample_num_signs = Vec::with_capacity(batch_size); // 每个sample有几个特征值，通常是1, 对于序列和tag特征，>=0

          let mut m: HashMap<u64, Vec<(u16, u16)>> = HashMap::default();
          batch
              .into_iter()
              .enumerate()
              .for_each(|(batch_idx, indices)| { // row_index=batch_index, indices=values
                  sample_num_signs.push(indices.len() as u32); // 计算当前特征有几个值，通常是1, 对于序列和tag特征，>=0
                  indices.into_iter().enumerate().for_each(|(col_idx, id)| { // col_index, id=value
                      m.entry(id)
                          .or_default()
                          .push((batch_idx as u16, col_idx as u16));  // value -> [(batch_index=row_index, col_inex), ...]
                  })
              });
          let mut hashed2index_batch_idx: HashMap<u64, i64> = HashMap::default();
          m.iter().enumerate().for_each(|(idx, (id, _))| { // idx=batch_index, (id=value, _)
              hashed2index_batch_idx.insert(*id, idx as i64); // value -> index of hash map
          });
          Self {
              feature_name,
              index_batch: m
                  .into_iter()
                  .map(|x| SingleSignInFeatureBatch { // sign: value, in_which_batch_samples: [(batch_index, col_index), (batch_index, col_index), ...]
                      sign: x.0,
                      in_which_batch_samples: x.1,
                  })
                  .collect_vec(),
              sample_num_signs,
              hashed2index_batch_idx,
              batch_size: batch_size as u16,
          }
      }
  }

